import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits_batch():
  """64 real digits images, preprocessed as the digits config does: ([64, 8, 8, 1], [64])."""
  from lsvit import data
  src = data.digits("train")
  pp = data.Preprocess("plain", 8, 1)
  x = np.stack([pp(src[i][0]) for i in range(64)])
  y = np.asarray([src[i][1] for i in range(64)], np.int32)
  return x, y
