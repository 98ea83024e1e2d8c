"""Run as a script (by tests/test_train.py): one train step on 8 fake CPU devices
with per-device batch 1, against one step on 1 device with batch 8. Prints JSON
with the largest differences."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_config import tiny_config  # noqa: E402

from sils_jax.training import loop  # noqa: E402
from sils_jax.training.state import AXIS, create_states, init_key  # noqa: E402
from sils_jax.training.step import LossConfig, train_step  # noqa: E402


def run(devices, batch):
  config = tiny_config()
  g, d = create_states(config, init_key(config.seed))
  n = len(devices)
  step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS,
                  devices=devices)
  rep = lambda t: jax.tree.map(lambda a: np.broadcast_to(np.asarray(a)[None], (n,) + a.shape), t)
  sharded = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
  g, d, m = step(rep(g), rep(d), sharded)
  first = lambda t: jax.tree.map(lambda a: np.asarray(a[0]), t)
  return first(g.params), first(g.batch_stats), first(d.params), first(m)


def main():
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config()
  batch = loop.make_dataset(config).train_batch(0, 8)
  many = run(jax.devices(), batch)
  one = run(jax.devices()[:1], batch)
  out = {}
  for name, a, b in zip(("g_params", "batch_stats", "d_params", "metrics"), many, one):
    diffs = [float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    scale = [float(np.max(np.abs(y))) for y in jax.tree.leaves(b)]
    out[name] = {"max_abs_diff": max(diffs), "max_abs_value": max(scale)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
