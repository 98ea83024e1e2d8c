"""Separate images into layers with a trained run.

  python -m sils_jax.separate --workdir=RUN --input=PATH --output=DIR

PATH is one image or a directory of images (any format PIL reads, any size). For
every image ``<stem>.<ext>`` it writes ``<stem>.<layer_name>.png`` for each layer
of the run's config and ``<stem>.recomposed.png`` (the layers blended back).
Unreadable files are reported by name and skipped; the exit code is 1 if any failed.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from sils_jax.logs import quiet_libraries

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_string("input", None, "An image file or a directory of images.")
flags.DEFINE_string("output", None, "Directory for the separated layers.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to use (default: latest).")


def list_images(path: str) -> list[str]:
  """The image files at ``path`` (a file, or the files of a directory with an image extension)."""
  from PIL import Image
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input {path!r}: no such file or directory")
  extensions = {ext.lower() for ext in Image.registered_extensions()}
  files = sorted(os.path.join(path, f) for f in os.listdir(path)
                 if os.path.splitext(f)[1].lower() in extensions and os.path.isfile(os.path.join(path, f)))
  if not files:
    raise FileNotFoundError(f"--input {path!r}: the directory holds no image files")
  return files


def read_image(path: str):
  """Reads any PIL image as a numpy array (uint8 or uint16), converting palette/CMYK modes to RGB."""
  import numpy as np
  from PIL import Image
  with Image.open(path) as im:
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L"):
      return np.asarray(im, dtype=np.uint16)
    if im.mode not in ("L", "RGB", "RGBA"):
      im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
    return np.asarray(im)


def separate_files(separator, files: list[str], output: str) -> list[tuple[str, str]]:
  """Separates every file into ``output``; returns (file, error) for the ones that failed."""
  from sils_jax.image_grid import save_png
  os.makedirs(output, exist_ok=True)
  failures = []
  start = time.time()
  for i, path in enumerate(files, 1):
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      image = read_image(path)
      layers = separator(image, name=path)
    except Exception as e:  # noqa: BLE001 - report the file and go on with the rest
      failures.append((path, f"{type(e).__name__}: {e}"))
      logging.error("[%d/%d] %s: failed: %s", i, len(files), path, e)
      continue
    for name, layer in layers.items():
      save_png(os.path.join(output, f"{stem}.{name}.png"), layer)
    save_png(os.path.join(output, f"{stem}.recomposed.png"), separator.recompose(layers))
    logging.info("[%d/%d] %s (%dx%d) -> %d layers, %.1f s elapsed", i, len(files), path,
                 image.shape[1], image.shape[0], len(layers), time.time() - start)
  return failures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from sils_jax.inference import Separator
  quiet_libraries()
  try:
    files = list_images(FLAGS.input)
    separator = Separator.from_workdir(FLAGS.workdir, FLAGS.checkpoint_step)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  logging.info("separating %d image(s) with %s (step %d, layers %s)", len(files), FLAGS.workdir,
               separator.step, ", ".join(separator.layer_names))
  failures = separate_files(separator, files, FLAGS.output)
  if failures:
    print(f"{len(failures)} of {len(files)} image(s) failed:", file=sys.stderr)
    for path, err in failures:
      print(f"  {path}: {err}", file=sys.stderr)
    sys.exit(1)
  logging.info("wrote %d image(s) to %s", len(files), FLAGS.output)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "input", "output"])
  app.run(main)
