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


def unreplicate(tree):
  """The first device's copy of every leaf."""
  return jax.tree.map(lambda a: a[0], tree)


def shard(batch: dict) -> dict:
  """Host arrays [B, ...] -> device arrays [devices, B / devices, ...]."""
  n = jax.local_device_count()
  sharding = local_sharding()
  return jax.tree.map(lambda a: jax.device_put(a.reshape((n, -1) + a.shape[1:]), sharding), batch)
