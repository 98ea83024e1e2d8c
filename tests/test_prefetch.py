"""The input prefetcher gives exactly the synchronous batches, in order, and surfaces errors."""

import threading

import numpy as np
import pytest

from sils_jax.data.prefetch import Prefetcher
from sils_jax.data.synthetic import SyntheticLayers


@pytest.mark.parametrize("depth,workers", [(0, 1), (1, 1), (3, 2), (8, 4)])
def test_prefetched_batches_equal_synchronous_ones(depth, workers):
  data = SyntheticLayers(image_size=16, num_train=7)
  with Prefetcher(lambda s: data.train_batch(s, 2), 3, 12, depth=depth, workers=workers) as p:
    for step in range(3, 12):
      got, want = p.get(step), data.train_batch(step, 2)
      np.testing.assert_array_equal(got["x"], want["x"])
      np.testing.assert_array_equal(got["layers"], want["layers"])


def test_batches_are_made_ahead_in_worker_threads():
  made = {}
  def make(step):
    made[step] = threading.current_thread().name
    return step
  with Prefetcher(make, 0, 20, depth=3, workers=2) as p:
    assert [p.get(s) for s in range(5)] == list(range(5))
  # steps up to 4 + 3 may have been made ahead, never past that window
  assert set(made) >= {0, 1, 2, 3, 4} and max(made) <= 7
  assert all(name.startswith("sils_input") for name in made.values())


def test_worker_errors_reach_the_caller_and_order_is_enforced():
  def make(step):
    if step == 2:
      raise OSError("disk gone")
    return step
  with Prefetcher(make, 0, 5, depth=2, workers=2) as p:
    assert p.get(0) == 0 and p.get(1) == 1
    with pytest.raises(OSError, match="disk gone"):
      p.get(2)
    with pytest.raises(ValueError, match="after a later step"):
      p.get(1)
  with pytest.raises(ValueError, match="depth"):
    Prefetcher(make, 0, 5, depth=-1)
