"""lsvit/fetch.py on its own: a toy layer function, the gradient JAX computes as reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsvit import fetch


@pytest.mark.parametrize("x0", [1.5, -2.0, 0.0, -0.0, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_after_returns_the_index_unchanged(x0, backend, monkeypatch):
  """The dependency is a zero whatever the sign bit, infinity or NaN of x (CPU path), or a
  barrier (other backends); under jit, where the simplifier could otherwise fold it."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x = jnp.full((2, 3), x0, jnp.float32)
  for idx in (0, 3, 11):
    got = jax.jit(fetch.after)(x, jnp.int32(idx))
    assert got.dtype == jnp.int32 and int(got) == idx


def toy_layer(w, shared, x, i, extras):
  """A layer whose gradient reaches every input: weights, a shared table, x; ``extras`` scales."""
  y = jnp.tanh(x @ w["k"] + w["b"]) + shared[i] * extras
  return y, {"mean": y.mean()}


@pytest.mark.parametrize("order", [[3, 0, 2, 1], [2, 0], [1]])
def test_fetch_layers_matches_jax_gradient(order):
  rng = np.random.default_rng(0)
  depth, d = 4, 5
  stack = {"k": jnp.asarray(rng.normal(size=(depth, d, d)) / d, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(depth, d)), jnp.float32)}
  shared = jnp.asarray(rng.normal(size=(len(order), d)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, d)), jnp.float32)
  order = jnp.asarray(order, jnp.int32)
  n = order.shape[0]

  def reference(stack, shared, x):  # plain indexing, JAX's own gradient
    outs = []
    for i in range(n):
      x, out = toy_layer(jax.tree.map(lambda a: a[order[i]], stack), shared, x, i, 0.5)
      outs.append(out["mean"])
    return jnp.sum(x ** 2) + sum(outs)

  def fetched(stack, shared, x):
    x, outs = fetch.fetch_layers(toy_layer, n)(stack, shared, x, order, 0.5)
    return jnp.sum(x ** 2) + sum(o["mean"] for o in outs)

  want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(stack, shared, x)
  got = jax.jit(jax.value_and_grad(fetched, argnums=(0, 1, 2)))(stack, shared, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
    assert float(np.abs(a).max()) > 0  # not two zeros compared
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  unused = np.setdiff1d(np.arange(depth), np.asarray(order))
  assert all(np.all(np.asarray(g)[unused] == 0) for g in jax.tree.leaves(got[1][0]))


def test_unpermute_inverts_a_permutation_and_scatters_a_pruned_order():
  g = {"a": jnp.arange(12.0).reshape(4, 3)}
  perm = jnp.asarray([2, 0, 3, 1])
  back = fetch.unpermute(jax.tree.map(lambda a: a[perm], g), perm, {"a": 4})
  np.testing.assert_array_equal(back["a"], g["a"])
  pruned = fetch.unpermute({"a": g["a"][:2]}, jnp.asarray([3, 1]), {"a": 4})
  np.testing.assert_array_equal(pruned["a"], [[0, 0, 0], [3, 4, 5], [0, 0, 0], [0, 1, 2]])
