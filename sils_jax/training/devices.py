"""Placing states and batches on the local devices for the pmapped step.

``flax.jax_utils.replicate`` places arrays on a mesh axis named
'_device_put_sharded'; the pmapped step returns arrays on a mesh axis named after
its ``axis_name``. jax keys its compilation cache on the sharding, so the second
step would compile the whole train step again (23 s on 2 CPU cores). Placing the
inputs on the same mesh as the outputs avoids that.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sils_jax.training.state import AXIS


def local_sharding() -> NamedSharding:
  mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree):
  """Copies every leaf to all local devices, stacked on a leading device axis."""
  sharding = local_sharding()
  n = jax.local_device_count()

  def put(a):
    a = np.asarray(jax.device_get(a))
    return jax.device_put(np.broadcast_to(a[None], (n,) + a.shape), sharding)
  return jax.tree.map(put, tree)


def first_copy(a):
  """The first local device's slice of a [devices, ...] array, still on that device,
  read from its buffer without running a computation (``a[0]`` would compile a
  gather over every local device)."""
  if isinstance(a, jax.Array) and len(a.addressable_shards) > 1:
    return a.addressable_shards[0].data  # [1, ...]
  return a[:1]


def unreplicate(tree):
  """The first device's copy of every leaf, as host numpy arrays.

  No device computation runs: in a multi-process job every computation over several
  devices is a collective step that the processes must take in the same order, and a
  process-local gather issued while another process waits in a global collective
  was seen to hang (tests/test_multihost.py)."""
  return jax.tree.map(lambda a: np.asarray(first_copy(a))[0], tree)


def shard(batch: dict) -> dict:
  """Host arrays [B, ...] -> device arrays [devices, B / devices, ...]."""
  n = jax.local_device_count()
  sharding = local_sharding()
  return jax.tree.map(lambda a: jax.device_put(a.reshape((n, -1) + a.shape[1:]), sharding), batch)
