"""Train a layer-separation model: python -m sils_jax.main --config=configs/synthetic.py --workdir=DIR

Override any config field with --config.FIELD=VALUE; choose a variant with
--config=configs/synthetic.py:quick.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sils_jax.logs import quiet_libraries

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and sample images.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_bool("keep_freed_memory", False, "Opt-in, CPU-only Linux hosts: set glibc's malloc for the "
                  "whole process to keep the memory a training step frees for the next step (no page "
                  "faults per step; the process keeps its peak memory). Measured gain: "
                  "benchmarks/README.md. See sils_jax/cpu_kernels/memory.py.")
flags.DEFINE_bool("huge_pages", False, "Opt-in, with --keep_freed_memory: back the heap that holds the "
                  "step's memory with transparent huge pages after the first step (Linux). See "
                  "sils_jax/cpu_kernels/memory.py.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_libraries()
  if FLAGS.keep_freed_memory:  # before jax starts its CPU threads
    from sils_jax.cpu_kernels.memory import keep_freed_memory
    logging.info("Keeping freed memory between steps (glibc malloc): %s", keep_freed_memory())
  from sils_jax.training import config_checks, loop  # after flag parsing: keeps --help fast
  from sils_jax.training.distributed import initialize_distributed
  initialize_distributed(FLAGS.config)  # before anything touches the devices
  from sils_jax.data.image_io import DataError
  after_first_step = None
  if FLAGS.keep_freed_memory and FLAGS.huge_pages:
    def after_first_step():
      from sils_jax.cpu_kernels.memory import use_huge_pages
      logging.info("Backing the heap with huge pages: %s", use_huge_pages())
  try:
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, after_first_step=after_first_step)
  except (config_checks.ConfigError, DataError, FloatingPointError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  logging.info("final evaluation: %s", result)


if __name__ == "__main__":
  app.run(main)
