"""Train a layer-separation model: python -m sils_jax.main --config=configs/synthetic.py --workdir=DIR

Override any config field with --config.FIELD=VALUE; choose a variant with
--config=configs/synthetic.py:quick.
"""

import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and sample images.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax and jax (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/jax/_src/", "/jaxlib/"))
    return record.levelno >= logging_std.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from sils_jax.training import config_checks, loop  # after flag parsing: keeps --help fast
  try:
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_checks.ConfigError, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  logging.info("final evaluation: %s", result)


if __name__ == "__main__":
  app.run(main)
