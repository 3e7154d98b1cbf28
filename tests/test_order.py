import jax
import numpy as np
import pytest

from lsvit import order as order_lib


@pytest.mark.parametrize("bad, message", [
    ([0, 1, 1], "duplicate entries [1]"),
    ([0, 12], "out-of-range entries [12]"),
    ([-1, 2], "out-of-range entries [-1]"),
    ([0.0, 1.0], "must contain integer"),
    ([True, False], "must contain integer"),
    ([], "empty"),
    (list(range(13)), "13 entries but the model has only 12"),
    ([[0, 1]], "1-D"),
])
def test_check_order_rejects(bad, message):
  with pytest.raises(ValueError) as e:
    order_lib.check_order(bad, 12)
  assert message in str(e.value)


def test_check_order_accepts_permutations_and_prunes():
  assert order_lib.check_order([3, 0, 5], 12).tolist() == [3, 0, 5]
  assert order_lib.check_order(np.arange(12)[::-1], 12).dtype == np.int32


def test_training_orders():
  key = jax.random.key(0)
  o, a = order_lib.training_order("layershuffle", key, 12)
  assert sorted(np.asarray(o).tolist()) == list(range(12)) and a is None
  o2, _ = order_lib.training_order("layershuffle", jax.random.key(1), 12)
  assert np.asarray(o).tolist() != np.asarray(o2).tolist()
  o, a = order_lib.training_order("baseline", key, 12)
  assert np.asarray(o).tolist() == list(range(12)) and a is None
  o, a = order_lib.training_order("layerdrop", key, 12, 0.2)
  assert np.asarray(o).tolist() == list(range(12)) and a.shape == (12,)
  # p = 0.2 drops about a fifth of the layers over many draws
  drops = [1 - np.asarray(order_lib.training_order("layerdrop", jax.random.key(i), 12, 0.2)[1]).mean()
           for i in range(200)]
  assert abs(np.mean(drops) - 0.2) < 0.03
  with pytest.raises(ValueError, match="unknown variant"):
    order_lib.training_order("shuffle", key, 12)


def test_prune_orders():
  rng = np.random.default_rng(0)
  o = order_lib.prune_orders(rng, 20, 12, 6, "random")
  assert o.shape == (20, 6) and all((np.diff(r) > 0).all() for r in o)
  o = order_lib.prune_orders(rng, 3, 12, 4, "even")
  assert o[0].tolist() == [0, 4, 7, 11]
  o = order_lib.prune_orders(rng, 3, 12, 3, "first", shuffle=True)
  assert sorted(o[0].tolist()) == [0, 1, 2]
  with pytest.raises(ValueError, match="cannot keep 13 layers"):
    order_lib.prune_orders(rng, 1, 12, 13)
