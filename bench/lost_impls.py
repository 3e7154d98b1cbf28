"""The order implementations that lost to 'fetch' (BENCHMARKS.md, "How to run layers in a
runtime order"), kept so that ``bench/order_impl.py`` can measure them again:

- 'permute': the stack gathered into execution order once per training step
  (``permute_layers``, whose gradient is the inverse gather), the layers unrolled on a split
  of it; the permuted copy lives through the step (as fast as 'fetch', 1.09-1.15x memory).
- 'unrolled': a Python loop over positions, each indexing ``order[i]`` of the stack.

``build(cfg)`` is ``lsvit.model.build`` that also accepts these two.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lsvit import fetch as fetch_lib
from lsvit import model as model_lib

IMPLS = model_lib.IMPLS + ("permute", "unrolled")


@jax.custom_vjp
def permute_layers(stack, order):
  """``stack[order]`` for every leaf; its gradient is the inverse gather for a permutation of
  all layers (instead of XLA's generic scatter-add), a scatter into zeros for a pruned order."""
  return jax.tree.map(lambda a: jnp.take(a, order, axis=0), stack)


def _permute_fwd(stack, order):
  return permute_layers(stack, order), (order, jax.tree.map(lambda a: a.shape[0], stack))


def _permute_bwd(res, g):
  order, sizes = res
  return fetch_lib.unpermute(g, order, sizes), None


permute_layers.defvjp(_permute_fwd, _permute_bwd)


class Encoder(model_lib.Encoder):

  def run_layers(self, run_block, finish, stack, table, key, x, order, act, train):
    n = order.shape[0]
    step = lambda x, position, layer: finish(
        lambda x: run_block(layer, x, position), x, act[position])
    if self.remat:
      step = jax.checkpoint(step, static_argnums=(1,))
    if self.impl == "permute" and train:
      perm = permute_layers(stack, order)
      # Split, not a[i]: the gradient of a split is one concatenate, while the gradients of
      # L static slices are L zero-padded full stacks summed (O(L^2) traffic).
      parts = jax.tree.map(lambda a: [jnp.squeeze(p, 0) for p in jnp.split(a, n, axis=0)], perm)
      layers = [jax.tree.map(lambda _, ps: ps[i], stack, parts,
                             is_leaf=lambda t: isinstance(t, list)) for i in range(n)]
    elif self.impl == "unrolled":
      layers = [fetch_lib.layer(stack, order[i]) for i in range(n)]
    else:
      return super().run_layers(run_block, finish, stack, table, key, x, order, act, train)
    outs = []
    for i in range(n):
      x, out = step(x, i, layers[i])
      outs.append(out)
    return x, model_lib._stack(outs)


class ViT(model_lib.ViT):
  impls = IMPLS
  encoder = Encoder


def build(cfg) -> model_lib.ViT:
  return model_lib.build(cfg, cls=ViT)
