"""Overhead of the training loop's logging, progress, NaN guard and checkpointing
against a bare loop of the same pmapped step on the same data.

  python benchmarks/loop_overhead.py [--steps=600] [--config=configs/synthetic.py:quick]

Prints one JSON object: img/s of both, and the overhead in percent. Compilation is
excluded from both (the first `--warmup` steps are not timed).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/synthetic.py:quick", "Training config.")
flags.DEFINE_integer("steps", 600, "Timed steps.")
flags.DEFINE_integer("warmup", 20, "Untimed steps (compilation).")
flags.DEFINE_integer("checkpoint_every", 0, "Checkpoint interval of the full loop (0: a third of --steps).")


def bare(config, steps, warmup):
  import functools
  import jax
  from sils_jax.training import loop
  from sils_jax.training.devices import replicate, shard
  from sils_jax.training.state import AXIS, create_states, init_key
  from sils_jax.training.step import LossConfig, train_step
  g, d = create_states(config, init_key(config.seed))
  step_fn = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS,
                     donate_argnums=(0, 1))
  g, d = replicate(g), replicate(d)
  data = loop.make_dataset(config)
  b = config.per_device_batch_size * jax.device_count()
  for s in range(warmup):
    g, d, m = step_fn(g, d, shard(data.train_batch(s, b)))
  jax.block_until_ready(m)
  t = time.perf_counter()
  for s in range(warmup, warmup + steps):
    g, d, m = step_fn(g, d, shard(data.train_batch(s, b)))
  jax.block_until_ready(m)
  return steps * b / (time.perf_counter() - t)


def full(config, steps, warmup):
  from sils_jax.training import loop
  workdir = tempfile.mkdtemp(prefix="sils_overhead_")
  config.num_train_steps = warmup + steps
  config.log_every_steps = min(100, steps)
  config.eval_every_steps = 10 ** 9  # evaluation is its own cost (the last step still runs one:
  config.num_eval_images = 1         # make it one image)
  config.eval_batch_size = 1
  config.num_sample_images = 1
  config.checkpoint_every_steps = FLAGS.checkpoint_every or max(steps // 3, 1)
  t = [None]

  # time from the end of step `warmup` to the end of the run (checkpoints included)
  import jax
  from sils_jax.training.writers import Progress
  orig_call = Progress.__call__

  def timed(self, step):
    if step == warmup:
      jax.effects_barrier()
      t[0] = time.perf_counter()
    return orig_call(self, step)
  Progress.__call__ = timed
  try:
    loop.train_and_evaluate(config, workdir)
  finally:
    Progress.__call__ = orig_call
  b = config.per_device_batch_size * jax.device_count()
  return steps * b / (time.perf_counter() - t[0])


def main(argv):
  del argv
  import jax
  config = FLAGS.config
  base = bare(config, FLAGS.steps, FLAGS.warmup)
  with_loop = full(config, FLAGS.steps, FLAGS.warmup)
  print(json.dumps({"device": jax.devices()[0].device_kind, "image_size": config.image_size,
                    "batch": config.per_device_batch_size * jax.device_count(), "steps": FLAGS.steps,
                    "checkpoint_every": FLAGS.checkpoint_every or max(FLAGS.steps // 3, 1),
                    "bare_img_per_s": round(base, 3), "loop_img_per_s": round(with_loop, 3),
                    "overhead_percent": round(100 * (base - with_loop) / base, 2)}))


if __name__ == "__main__":
  app.run(main)
