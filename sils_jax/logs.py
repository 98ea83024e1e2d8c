"""Command-line logging: our progress lines at INFO, libraries' chatter only from WARNING."""

import logging as logging_std

from absl import logging


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax and jax (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/jax/_src/", "/jaxlib/"))
    return record.levelno >= logging_std.WARNING or not noisy


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
