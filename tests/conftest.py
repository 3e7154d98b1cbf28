import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits_batch():
  """64 real digits images, preprocessed as the digits config does: ([64, 8, 8, 1], [64])."""
  from lsvit import data
  src = data.digits("train")
  pp = data.Preprocess("plain", 8, 1)
  x = np.stack([pp(src[i][0]) for i in range(64)])
  y = np.asarray([src[i][1] for i in range(64)], np.int32)
  return x, y


def digits_config(**overrides):
  """The digits config, small and quick, with dotted overrides ('optimizer.lr': ...)."""
  import sys
  sys.path.insert(0, ROOT)
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
