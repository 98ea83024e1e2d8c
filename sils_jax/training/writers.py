"""Metric writers, a progress reporter and a profiling window, all without TensorFlow.

A run's metrics always go to plain files in its workdir:

  WORKDIR/train_metrics.jsonl   one JSON object per ``write_scalars`` call: {"step": s, ...}
  WORKDIR/eval_metrics.jsonl    the same for keys written as "eval/<name>" (prefix stripped)
  WORKDIR/samples/<name>_<step:07d>.png
  WORKDIR/hparams.json

``sils_jax.plots`` reads the two JSON-lines files. TensorBoard event files (scalars, sample
images, hparams) go to ``WORKDIR/tensorboard`` through tensorboardX, a pure-Python writer:
TensorFlow (which clu's ``metric_writers`` imports, and our accelerator hosts lack) is never
needed. ``Progress`` stands in for ``clu.periodic_actions.ReportProgress`` for the same reason.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import numbers
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

from sils_jax.image_grid import to_uint8

TRAIN_FILE = "train_metrics.jsonl"
EVAL_FILE = "eval_metrics.jsonl"
EVAL_PREFIX = "eval/"
SAMPLES_DIR = "samples"
HPARAMS_FILE = "hparams.json"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
TENSORBOARD_MODES = ("auto", "on", "off")


class Writer(abc.ABC):
  """What the training loop writes through; a subset of ``clu.metric_writers.MetricWriter``.

  Usable as a context manager: leaving the ``with`` block closes the writer.
  """

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars (floats, numpy or jax scalars) of one step."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images of one step, each HxWx3 (or 1xHxWx3), uint8 or float in [0, 1]."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyper-parameters (once per run)."""

  def flush(self) -> None:
    """Writes out anything buffered."""

  def close(self) -> None:
    """Flushes; the writer is not used afterwards."""
    self.flush()

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class NullWriter(Writer):
  """Writes nothing: for the processes other than 0 of a multi-host job."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_hparams(self, hparams):
    pass


class FileWriter(Writer):
  """JSON lines, PNG and JSON files under ``workdir``; numpy and pillow only.

  Each ``write_scalars`` call appends one line, opened and closed per call, so a crash
  loses nothing already written and a reader (``sils_jax.plots``) can follow a running job.
  """

  def __init__(self, workdir: str):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Keys "eval/<name>" -> ``eval_metrics.jsonl`` as <name>, the rest -> ``train_metrics.jsonl``.

    Each file with at least one value gets one record ``{"step": step, **values}``; a key
    "step" among the scalars is dropped (the ``step`` argument is the record's step).
    """
    step = _as_step(step)
    train: dict[str, float] = {}
    evals: dict[str, float] = {}
    for key, value in scalars.items():
      if key.startswith(EVAL_PREFIX):
        evals[key[len(EVAL_PREFIX):]] = _as_float(key, value)
      else:
        train[key] = _as_float(key, value)
    for name, values in ((TRAIN_FILE, train), (EVAL_FILE, evals)):
      values.pop("step", None)
      if values:
        _append_line(os.path.join(self.workdir, name), json.dumps({"step": step, **values}))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Each image -> ``WORKDIR/samples/<name>_<step:07d>.png`` ("/" in a name becomes "_")."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    step = _as_step(step)
    out_dir = os.path.join(self.workdir, SAMPLES_DIR)
    os.makedirs(out_dir, exist_ok=True)
    for name, image in images.items():
      pixels = to_uint8_image(name, image)
      if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
      path = os.path.join(out_dir, f"{_file_name(name)}_{step:07d}.png")
      tmp = path + ".tmp"
      Image.fromarray(pixels).save(tmp, format="PNG")
      os.replace(tmp, path)  # a reader never sees half a file

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """``WORKDIR/hparams.json`` (replaced whole; numpy values become Python numbers)."""
    path = os.path.join(self.workdir, HPARAMS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(_to_dict(hparams), f, indent=2, sort_keys=True, default=_json_default)
      f.write("\n")
    os.replace(tmp, path)


class MultiWriter(Writer):
  """Forwards every call to each of its writers, in order."""

  def __init__(self, writers: Sequence[Any]):
    self.writers = tuple(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


class TensorBoardWriter(Writer):
  """TensorBoard event files under ``logdir`` through ``tensorboardX.SummaryWriter``.

  Takes what ``FileWriter`` takes: scalars keep their keys as tags ("eval/<name>" included;
  a key "step" or "eval/step" is dropped) and are written only when finite (NaN / inf are
  skipped, with one warning per tag); images become HxWx3 uint8 (``to_uint8_image``);
  hparams go both to the hparams plugin (flattened to bool/float/str values) and, as JSON,
  to the text tag "hparams". ``close`` flushes and closes the event file.

  Raises ImportError (from the constructor) if tensorboardX does not import.
  """

  def __init__(self, logdir: str, flush_secs: int = 30):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.logdir = os.fspath(logdir)
    self.summary_writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)
    self._warned_tags: set[str] = set()

  def write_scalars(self, step, scalars):
    step = _as_step(step)
    for key, value in scalars.items():
      value = _as_float(key, value)  # the same checks as FileWriter
      if key in ("step", EVAL_PREFIX + "step"):
        continue
      if not math.isfinite(value):
        if key not in self._warned_tags:
          self._warned_tags.add(key)
          logging.warning("TensorBoard: scalar %r is %s at step %d; non-finite values are "
                          "not written to %s (they are in the JSON-lines files)",
                          key, value, step, self.logdir)
        continue
      self.summary_writer.add_scalar(key, value, global_step=step)

  def write_images(self, step, images):
    step = _as_step(step)
    for name, image in images.items():
      pixels = to_uint8_image(name, image)  # HxWxC uint8
      if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)  # HxWx3: what TensorBoard shows as RGB
      self.summary_writer.add_image(name, pixels, global_step=step, dataformats="HWC")
    self.summary_writer.flush()  # rare (once per eval): show samples promptly

  def write_hparams(self, hparams):
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    values = _to_dict(hparams)
    flat = _flat_hparams(values)
    file_writer = self.summary_writer._get_file_writer()  # pylint: disable=protected-access
    # Into this run's own event file (SummaryWriter.add_hparams would open a sub-run); the
    # session-end record is left out: the run has only started.
    experiment, session_start, _ = hparams_summary(flat, {})
    file_writer.add_summary(experiment)
    file_writer.add_summary(session_start)
    text = json.dumps(values, indent=2, sort_keys=True, default=_json_default)
    self.summary_writer.add_text("hparams", f"```json\n{text}\n```", global_step=0)
    self.summary_writer.flush()

  def flush(self):
    self.summary_writer.flush()

  def close(self):
    self.summary_writer.close()  # flushes, then closes the event file


def make_writer(workdir: str, *, lead: bool = True, tensorboard: str = "auto") -> Writer:
  """Returns the metric writer of a run.

  Args:
    workdir: the run's directory (created if missing, on the lead process only).
    lead: False on the processes other than 0 of a multi-host job: they get a
      ``NullWriter`` and write nothing.
    tensorboard: ``config.tensorboard``. "auto": also write TensorBoard event files to
      ``WORKDIR/tensorboard`` with tensorboardX if it imports (it does on the default
      install); if it does not, one warning and only the files. "on": the event files are
      required (ImportError if tensorboardX does not import). "off": files only.

  Raises:
    ValueError: ``tensorboard`` is not "auto", "on" or "off".
    ImportError: ``tensorboard="on"`` and tensorboardX does not import.
  """
  if tensorboard not in TENSORBOARD_MODES:
    raise ValueError(f"make_writer: tensorboard must be one of {TENSORBOARD_MODES}, "
                     f"got {tensorboard!r}")
  if not lead:
    return NullWriter()
  if tensorboard == "off":
    return FileWriter(workdir)
  try:
    import tensorboardX  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # ImportError, or a broken install (e.g. a protobuf mismatch)
    if tensorboard == "on":
      raise ImportError(
          f"config.tensorboard='on' needs tensorboardX for the TensorBoard event files, but "
          f"importing it failed ({type(e).__name__}: {e}). Install it "
          f"(pip install 'tensorboardX>=2.6'), or set config.tensorboard='auto' or 'off' to "
          f"write only {TRAIN_FILE}, {EVAL_FILE} and PNG samples to {workdir}.") from e
    logging.warning("TensorBoard is off (config.tensorboard='auto') because importing "
                    "tensorboardX failed (%s: %s); metrics go to %s and %s in %s",
                    type(e).__name__, e, TRAIN_FILE, EVAL_FILE, workdir)
    return FileWriter(workdir)
  files = FileWriter(workdir)
  board = TensorBoardWriter(os.path.join(os.fspath(workdir), TENSORBOARD_DIR))
  return MultiWriter([files, board])


# ------------------------------------------------------------------- progress


class Progress:
  """Steps/s, images/s and time to go, every ``every_steps`` steps and at the last one.

  A TensorFlow-free stand-in for ``clu.periodic_actions.ReportProgress``. Call it with the
  number of steps done after each step; rates are measured (``time.monotonic``) since the
  previous report, or since construction for the first one (so the first includes
  compilation, as the loop's own rate did).

  With a ``writer``, the report goes to it as scalars at the same step; through a
  ``FileWriter`` that is a second record of that step in ``train_metrics.jsonl``, and
  ``sils_jax.plots.read_jsonl`` keeps only the last record of a step. To keep one record
  per step, pass no writer and merge the returned dict into the step's own scalars.
  """

  def __init__(self, num_train_steps: int, every_steps: int, writer: Writer | None = None,
               global_batch: int = 1, start_step: int = 0):
    if int(every_steps) < 1:
      raise ValueError(f"Progress: every_steps must be >= 1, got {every_steps}")
    if int(num_train_steps) < 1:
      raise ValueError(f"Progress: num_train_steps must be >= 1, got {num_train_steps}")
    self.num_train_steps = int(num_train_steps)
    self.every_steps = int(every_steps)
    self.writer = writer
    self.global_batch = int(global_batch)
    self._t_start = self._t_last = time.monotonic()
    self._step_last = int(start_step)

  def __call__(self, step: int) -> dict[str, float] | None:
    step = int(step)
    if step <= self._step_last:
      return None  # nothing done since the last report (e.g. called again at a resumed step)
    if step % self.every_steps and step != self.num_train_steps:
      return None
    now = time.monotonic()
    rate = (step - self._step_last) / max(now - self._t_last, 1e-9)
    self._t_last, self._step_last = now, step
    report = {
        "steps_per_s": rate,
        "img_per_s": rate * self.global_batch,
        "eta_s": max(self.num_train_steps - step, 0) / rate,
        "elapsed_s": now - self._t_start,
    }
    if self.writer is not None:
      self.writer.write_scalars(step, report)
    return report


def eta_str(seconds: float) -> str:
  """Seconds -> "H:MM:SS" (hours not wrapped at 24; negative -> "0:00:00"; inf/NaN -> "?")."""
  if not math.isfinite(seconds):
    return "?"
  s = max(int(round(seconds)), 0)
  return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


# -------------------------------------------------------------------- profiling


class ProfileWindow:
  """Traces ``num_steps`` steps from ``start_step`` into ``WORKDIR/profile`` (TensorBoard's
  profile plugin layout: ``plugins/profile/<run>/*.xplane.pb``).

  Call it with the index of each step *before* running it: the trace starts at
  ``start_step`` and stops when called with ``start_step + num_steps`` (or on ``close``, or
  leaving the ``with`` block). jax dispatches asynchronously: block on the step's outputs
  before the stop for the trace to hold whole steps. ``num_steps=0`` disables it. A
  profiler that fails to start or stop logs a warning instead of stopping training.
  """

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    if int(num_steps) < 0:
      raise ValueError(f"ProfileWindow: num_steps must be >= 0 (0 disables), got {num_steps}")
    self.logdir = os.path.join(os.fspath(workdir), PROFILE_DIR)
    self.start_step = int(start_step)
    self.stop_step = self.start_step + int(num_steps)
    self.active = False
    self.done = int(num_steps) == 0

  def __call__(self, step: int) -> None:
    step = int(step)
    if self.active and step >= self.stop_step:
      self.close()
    elif not self.done and not self.active and self.start_step <= step < self.stop_step:
      self._start(step)

  def _start(self, step: int) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    try:
      jax.profiler.start_trace(self.logdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("profiling off: jax.profiler.start_trace(%s) failed (%s: %s)",
                      self.logdir, type(e).__name__, e)
      self.done = True
      return
    self.active = True
    logging.info("profiling steps %d..%d into %s", step, self.stop_step - 1, self.logdir)

  def close(self) -> None:
    """Stops the trace if it is running (then the window is over)."""
    if not self.active:
      return
    import jax  # pylint: disable=g-import-not-at-top
    self.active, self.done = False, True
    try:
      jax.profiler.stop_trace()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("jax.profiler.stop_trace() failed (%s: %s); the trace in %s may be "
                      "missing", type(e).__name__, e, self.logdir)
      return
    logging.info("profile written to %s", self.logdir)

  def __enter__(self) -> "ProfileWindow":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@contextlib.contextmanager
def profile_window(workdir: str, start_step: int, num_steps: int) -> Iterator[ProfileWindow]:
  """``with profile_window(workdir, first, config.profile_steps) as profile:`` then
  ``profile(step)`` before each step; the trace is stopped on leaving, also on errors."""
  window = ProfileWindow(workdir, start_step, num_steps)
  try:
    yield window
  finally:
    window.close()


# -------------------------------------------------------------------- helpers


def to_uint8_image(name: str, image: Any) -> np.ndarray:
  """An HxWxC or 1xHxWxC image (C = 1 or 3), uint8 or float in [0, 1] -> uint8 HxWxC.

  Floats are clipped to [0, 1] and rounded; other dtypes, shapes or non-finite values
  raise ValueError naming the image.
  """
  a = np.asarray(image)
  if a.ndim == 4 and a.shape[0] == 1:
    a = a[0]
  if a.ndim != 3 or a.shape[-1] not in (1, 3) or 0 in a.shape:
    raise ValueError(f"image {name!r}: expected shape HxWx3 or 1xHxWx3 (or 1 channel), "
                     f"got {tuple(np.shape(image))}")
  if a.dtype == np.uint8:
    return a
  if not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"image {name!r}: expected uint8 or float in [0, 1], got dtype {a.dtype}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"image {name!r}: has NaN or inf values")
  return to_uint8(a)


def _as_step(step: Any) -> int:
  try:
    return int(np.asarray(step).item())
  except (TypeError, ValueError):
    raise ValueError(f"step must be an integer, got {step!r}") from None


def _as_float(key: str, value: Any) -> float:
  try:
    return float(np.asarray(value).item())  # numpy / jax scalars and 1-element arrays
  except (TypeError, ValueError):
    raise ValueError(f"scalar {key!r}: expected a number, got {type(value).__name__} "
                     f"of shape {np.shape(value)}") from None


def _append_line(path: str, line: str) -> None:
  with open(path, "a") as f:
    f.write(line + "\n")  # one write per record


def _file_name(name: str) -> str:
  return name.replace("/", "_").replace(os.sep, "_")


def _to_dict(hparams: Any) -> dict:
  if hasattr(hparams, "to_dict"):  # ml_collections.ConfigDict
    hparams = hparams.to_dict()
  return dict(hparams)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic) or (hasattr(value, "shape") and np.shape(value) == ()):
    return np.asarray(value).item()
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value, key=str)
  return str(value)


def _flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in hparams.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flat_hparams(value, name + "."))
    elif isinstance(value, (bool, str)):
      flat[name] = value
    elif isinstance(value, (numbers.Number, np.generic)) and np.ndim(value) == 0:
      v = np.asarray(value).item()
      flat[name] = v if isinstance(v, (bool, int, float)) else str(v)
    else:
      flat[name] = json.dumps(value, default=_json_default)
  return flat
