"""What several test modules share: the repository root and small digits configs."""
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config(**overrides):
  """The digits config, small and quick, with dotted overrides ('optimizer.lr': ...)."""
  from configs import digits
  c = digits.get_config()
  c.pretrain_epochs = 0
  c.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def tiny_config(**kw):
  """4 layers of width 32, 2 epochs: a training run in seconds."""
  base = {"model.depth": 4, "model.width": 32, "model.mlp_dim": 64, "model.num_heads": 2,
          "batch_size": 32, "eval_batch_size": 120, "num_epochs": 2, "log_every_steps": 5,
          "eval_orders": 2}
  base.update(kw)
  return digits_config(**base)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))
