"""Where the layer order is decided.

An *order* is a 1-D integer array of layer indices: ``arange(L)`` is the
original model, a permutation is a shuffled model, a shorter array a pruned one.
Orders are data, never structure: the model takes them as an argument, so one
compiled program serves every order of a given length.

Training draws its order inside the jitted step from a key that is the same on
every device (``training_order``); evaluation draws orders on the host from a
seeded numpy generator (``random_orders``/``prune_orders``) so results are
reproducible and independent of device count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("baseline", "layershuffle", "position", "predict", "layerdrop")
# Variants whose training order is a fresh random permutation every step.
SHUFFLED_VARIANTS = ("layershuffle", "position", "predict")


def check_order(order, num_layers: int) -> np.ndarray:
  """Returns ``order`` as int32 numpy, or raises ValueError saying what is wrong."""
  arr = np.asarray(order)
  if arr.ndim != 1:
    raise ValueError(f"layer order must be a 1-D array of layer indices, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError("layer order is empty: give at least one layer index")
  if arr.size > num_layers:
    raise ValueError(
        f"layer order has {arr.size} entries but the model has only {num_layers} layers")
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"layer order must contain integer layer indices, got dtype {arr.dtype} ({arr.tolist()})")
  bad = arr[(arr < 0) | (arr >= num_layers)]
  if bad.size:
    raise ValueError(
        f"layer order has out-of-range entries {bad.tolist()}: indices must be in [0, {num_layers})"
    )
  values, counts = np.unique(arr, return_counts=True)
  if (counts > 1).any():
    raise ValueError(
        f"layer order has duplicate entries {values[counts > 1].tolist()}: each layer may run once")
  return arr.astype(np.int32)


def order_is_valid(order: jax.Array, num_layers: int) -> jax.Array:
  """Traceable: True iff every index is in [0, num_layers) and none repeats (``check_order``'s
  rules for an order that is only known on the device)."""
  in_range = ((order >= 0) & (order < num_layers)).all()
  s = jnp.sort(order)
  distinct = (s[1:] != s[:-1]).all() if order.shape[0] > 1 else jnp.bool_(True)
  return in_range & distinct


def training_order(variant: str, key: jax.Array, num_layers: int, layerdrop: float = 0.0):
  """The order (and, for LayerDrop, the mask of layers that run) for one training step.

  Called inside the jitted step with a key derived from (seed, step) only, so
  every device and every host computes the same permutation.
  Returns ``(order, active)``; ``active`` is None unless variant is layerdrop.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  if variant in SHUFFLED_VARIANTS:
    return jax.random.permutation(key, num_layers).astype(jnp.int32), None
  order = jnp.arange(num_layers, dtype=jnp.int32)
  if variant == "layerdrop":
    return order, jax.random.bernoulli(key, 1.0 - layerdrop, (num_layers,))
  return order, None


def random_orders(rng: np.random.Generator, count: int, num_layers: int) -> np.ndarray:
  """``count`` random permutations of all layers, shape [count, num_layers]."""
  return np.stack([rng.permutation(num_layers) for _ in range(count)]).astype(np.int32)


def prune_orders(rng: np.random.Generator, count: int, num_layers: int, keep: int,
                 method: str = "random", shuffle: bool = False) -> np.ndarray:
  """Orders that keep ``keep`` of ``num_layers`` layers, shape [count, keep].

  method: 'random' (a random subset per order), 'even' (evenly spaced), 'first'.
  shuffle: run the kept layers in a random order instead of their original one.
  """
  if not 1 <= keep <= num_layers:
    raise ValueError(f"cannot keep {keep} layers of a {num_layers}-layer model: "
                     f"choose 1 <= k <= {num_layers}")
  out = []
  for _ in range(count):
    if method == "random":
      kept = np.sort(rng.choice(num_layers, keep, replace=False))
    elif method == "even":
      kept = np.unique(np.round(np.linspace(0, num_layers - 1, keep)).astype(int))
    elif method == "first":
      kept = np.arange(keep)
    else:
      raise ValueError(f"unknown prune method {method!r}; choose random, even or first")
    out.append(rng.permutation(kept) if shuffle else kept)
  return np.stack(out).astype(np.int32)
