"""The order in which training examples are read: one scheme for every dataset.

Unpaired training (paper Sec. 5.1) draws the input x and every layer image from
separate pools, each shuffled independently. Pool ``domain`` (0 for x, k + 1 for
layer k) holding ``num`` examples gives, at global example position ``p``, example
``perm_{domain, e}[p % num]`` with epoch ``e = p // num`` and ``perm_{domain, e}``
the permutation drawn from ``numpy.random.default_rng([seed, 7, domain, e])``.

The order is a pure function of (seed, domain, position), so a run resumed at step
``k`` reads exactly what an uninterrupted run reads, and process ``s`` of a
multi-host job can read its own rows of a global batch without the others.
"""

from __future__ import annotations

import functools

import numpy as np

# Seed component that separates the per-epoch shuffles from other random streams.
SHUFFLE_STREAM = 7


@functools.lru_cache(maxsize=64)
def epoch_permutation(seed: int, domain: int, epoch: int, num: int) -> np.ndarray:
  perm = np.random.default_rng([seed, SHUFFLE_STREAM, domain, epoch]).permutation(num)
  perm.flags.writeable = False  # shared by every call through the cache
  return perm


def example_indices(seed: int, domain: int, positions: np.ndarray, num: int) -> np.ndarray:
  """Example index of pool ``domain`` (``num`` examples) at global positions ``positions``."""
  positions = np.asarray(positions, dtype=np.int64)
  out = np.empty_like(positions)
  epochs = positions // num
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = epoch_permutation(int(seed), int(domain), int(epoch), int(num))[positions[sel] % num]
  return out


def shard_positions(step: int, batch_size: int, shard_index: int, num_shards: int) -> np.ndarray:
  """Global example positions of shard ``shard_index``'s rows of the batch at ``step``.

  ``b = batch_size // num_shards``; position ``step * batch_size + s * b + j``, j < b.
  """
  if batch_size < 1 or num_shards < 1:
    raise ValueError(f"batch_size and num_shards must be positive, got "
                     f"batch_size={batch_size}, num_shards={num_shards}")
  if batch_size % num_shards:
    raise ValueError(f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  b = batch_size // num_shards
  return int(step) * batch_size + shard_index * b + np.arange(b, dtype=np.int64)
