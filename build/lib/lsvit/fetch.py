"""``fetch_layers``: run layers in a runtime order over stacked weights, copying each layer's
weights out of the stack as it is about to run, forward and again backward, never keeping
them in between (the backward saves activations only). A runtime order then costs the plain
model's memory plus about two layers (measurements: BENCHMARKS.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer(stack, idx):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, idx, 0, keepdims=False), stack)


def unpermute(g, order, sizes):
  """Per-layer values in execution order (``g``, stacked) -> the stack's order: the inverse
  gather for a permutation of all layers, a scatter into zeros for a shorter order."""

  def back(g, n):
    if order.shape[0] == n:  # a permutation (orders are validated): invert it
      return jnp.take(g, jnp.argsort(order), axis=0)
    return jnp.zeros((n,) + g.shape[1:], g.dtype).at[order].add(g)

  return jax.tree.map(back, g, sizes)


def after(x, idx):
  """``idx``, made to depend on ``x``: a layer's weights are then copied out of the stack only
  once ``x`` exists, and a backward copy is never merged with the forward's (which would keep
  every layer's copy alive). Off CPU ``optimization_barrier`` says this; XLA's CPU pipeline
  drops the barrier, so there the dependency is a zero computed from x that its simplifier
  cannot see through (BENCHMARKS.md, "What impl='fetch' changed")."""
  if jax.default_backend() != "cpu":
    return jax.lax.optimization_barrier((x, idx))[1]
  bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
  return idx + jnp.minimum(jnp.abs(jax.lax.shift_right_arithmetic(bits, 31)), 0)


class _Saved:
  """A layer's pullback with its weights taken out (re-read from the stack when needed)."""

  def __init__(self, leaves, static):
    self.leaves, self.static = leaves, static


jax.tree_util.register_pytree_node(_Saved, lambda s: (s.leaves, s.static),
                                   lambda static, leaves: _Saved(list(leaves), static))


def fetch_layers(layer_fn, n):
  """``layer_fn(weights, shared, x, i, extras) -> (x, out)`` run for i < n on layer ``order[i]``
  of ``stack``, as one function with a custom gradient: the backward re-reads each layer's
  weights from the stack instead of keeping them. ``shared`` (the position table) gets the
  summed gradient, ``order`` and ``extras`` (flags, keys) none. ``after(prev, ...)`` takes the
  previous layer's input, so the copy for layer i overlaps layer i-1's work and at most two
  copies are alive. Orders name each layer at most once (``order.check_order``)."""

  def run(stack, shared, x, order, extras):
    outs, prev = [], x
    for i in range(n):
      w = layer(stack, after(prev, order[i]))
      prev = x
      x, out = layer_fn(w, shared, x, i, extras)
      outs.append(out)
    return x, outs

  def fwd(stack, shared, x, order, extras):
    saved, outs, prev = [], [], x
    for i in range(n):
      w = layer(stack, after(prev, order[i]))
      prev = x
      (x, out), pullback = jax.vjp(lambda w, s, x: layer_fn(w, s, x, i, extras), w, shared, x)
      leaves, treedef = jax.tree.flatten(pullback)
      wl = jax.tree.leaves(w)
      # The pullback holds the weights it multiplies by (found by identity): drop them.
      slots = tuple(next((k for k, t in enumerate(wl) if t is leaf), -1) for leaf in leaves)
      saved.append(_Saved([None if s >= 0 else leaf for leaf, s in zip(leaves, slots)],
                          (treedef, slots)))
      outs.append(out)
    return (x, outs), (stack, order, saved)

  def bwd(res, g):
    stack, order, saved = res
    gx, gouts = g
    gws, gshared, prev = [], None, gx
    for i in reversed(range(n)):
      wl = jax.tree.leaves(layer(stack, after(prev, order[i])))
      prev = gx
      treedef, slots = saved[i].static
      pullback = jax.tree.unflatten(treedef, [wl[s] if s >= 0 else leaf
                                              for leaf, s in zip(saved[i].leaves, slots)])
      gw, gs, gx = pullback((gx, gouts[i]))
      gws.append(gw)
      gshared = gs if gshared is None else jax.tree.map(jnp.add, gshared, gs)
    # Gradients in execution order, stacked, then put in the stack's order (inverse gather).
    gstack = jax.tree.map(lambda *g: jnp.stack(g[::-1]), *gws)
    gstack = unpermute(gstack, order, jax.tree.map(lambda a: a.shape[0], stack))
    return gstack, gshared, gx, None, None

  f = jax.custom_vjp(run)
  f.defvjp(fwd, bwd)
  return f
