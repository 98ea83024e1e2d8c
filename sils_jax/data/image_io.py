"""Reading a user's image files into uint8 RGB arrays (pillow only, no TensorFlow).

Every reader returns numpy arrays in a fixed layout so that the rest of the data
code never looks at file formats:

* :func:`read_rgb`:  ``uint8 [H, W, 3]``;
* :func:`read_mask`: ``uint8 [H, W]`` of 0 and 1;
* :func:`image_size`: ``(H, W)`` from the file header only.

Conversions done by :func:`read_rgb` (each one logged once per file with absl
logging, as ``"<path>: <what was done>"``):

* grayscale (pillow modes ``1``, ``L``, ``I;16*``, ``I``) -> the gray value
  replicated to the three channels;
* an alpha channel (``RGBA``, ``LA``, ``PA``, palette transparency) -> dropped
  (not composited onto a background: the colour values are kept as stored);
* palette (``P``) and other colour spaces (``CMYK``, ``YCbCr``, ...) -> RGB by pillow;
* 16-bit samples -> 8 bit by ``round(v / 257)``, computed exactly as
  ``(v + 128) // 257`` (no ties exist), so 0 -> 0 and 65535 -> 255. The MIT
  Intrinsic Images PNGs are 16-bit. Pillow itself decodes 16-bit RGB(A) PNGs to
  8 bit by keeping the high byte, ``v >> 8``, which is up to 1 below the rounded
  value; for those files the reader decodes the PNG twice, once keeping the high
  bytes and once the low bytes (pillow's ``RGB;16L`` unpacker applied to the
  big-endian data), and rebuilds ``v`` exactly. 16-bit gray+alpha PNGs (no
  low-byte unpacker in pillow) and 16-bit colour in other formats keep pillow's
  high-byte value; that case is logged as such.

EXIF orientation is not applied: pixels are returned as stored, and
:func:`image_size` reports the stored size, so the two always agree.

Errors a user can cause (missing directory, no images, unreadable or corrupt
file, unsupported pixel format) raise :class:`DataError`, whose message starts
with the offending path.
"""

from __future__ import annotations

import os
import threading

from absl import logging
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Exceptions pillow raises for unreadable, truncated or corrupt files.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
  """Bad user data; the message names the path and what was expected."""


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _log_once(path: str, what: str) -> None:
  """Logs ``"<path>: <what>"`` the first time this (file, conversion) is seen."""
  key = (os.path.abspath(path), what)
  with _logged_lock:
    if key in _logged:
      return
    _logged.add(key)
  logging.info("%s: %s", path, what)


def list_images(directory: str) -> list[str]:
  """Sorted paths of the image files directly in ``directory``.

  An image file is a non-hidden regular file whose extension (case-insensitive)
  is one of ``IMAGE_EXTENSIONS``; subdirectories and hidden files (names starting
  with ``.``) are ignored. Sorted by file name (plain string order).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such directory")
  names = sorted(
      name for name in os.listdir(directory)
      if not name.startswith(".")
      and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
      and os.path.isfile(os.path.join(directory, name)))
  if not names:
    raise DataError(f"{directory}: holds no image files (expected "
                    f"{'/'.join(IMAGE_EXTENSIONS)})")
  return [os.path.join(directory, name) for name in names]


def image_size(path: str) -> tuple[int, int]:
  """``(height, width)`` read from the file header only (no pixel decoding)."""
  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      width, height = im.size
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except _PIL_ERRORS as e:
    raise DataError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e
  return int(height), int(width)


def _to_8bit(values: np.ndarray) -> np.ndarray:
  """16-bit samples to 8 bit: ``round(v / 257) == (v + 128) // 257`` exactly."""
  v = np.clip(values.astype(np.int64), 0, 65535)
  return ((v + 128) // 257).astype(np.uint8)


def _png16_low_bytes(path: str, rawmode: str) -> np.ndarray | None:
  """Low bytes of a 16-bit RGB(A) PNG, or None where pillow cannot give them.

  Pillow unfilters the PNG rows by bytes per pixel, then unpacks each sample with
  ``rawmode``. ``RGB;16B`` keeps the first (high) byte of every big-endian
  sample; ``RGB;16L``, which unfilters the same rows identically, keeps the
  second byte, i.e. the low byte of the big-endian data.
  """
  low_rawmode = rawmode.replace(";16B", ";16L")
  try:
    with Image.open(path) as im:
      tile = im.tile[0]
      im.tile = [tile._replace(args=low_rawmode)]
      im.load()
      return np.array(im)
  except (ValueError, AttributeError, IndexError, TypeError):
    return None


def _decode(path: str) -> tuple[np.ndarray, list[str]]:
  """Pixels as stored, alpha dropped: ([H, W] or [H, W, 3], uint8 or uint16).

  Returns the array and the list of conversions applied (for the log).
  """
  path = os.fspath(path)
  notes: list[str] = []
  try:
    with Image.open(path) as im:
      rawmode = im.tile[0].args if (im.format == "PNG" and len(im.tile) == 1) else None
      im.load()
      mode = im.mode
      if mode in ("RGB", "RGBA") and rawmode in ("RGB;16B", "RGBA;16B"):
        high = np.array(im)
        low = _png16_low_bytes(path, rawmode)
        if low is None or low.shape != high.shape:
          notes.append("16-bit image: pillow kept only the high byte of each sample")
          array = high
        else:
          array = (high.astype(np.uint16) << 8) | low.astype(np.uint16)
        if mode == "RGBA":
          notes.append("alpha channel dropped")
          array = array[..., :3]
        return array, notes
      if mode in ("RGB", "RGBA") and rawmode == "LA;16B":
        notes.append("16-bit gray+alpha image: pillow kept only the high byte of each sample")
        notes.append("alpha channel dropped")
        return np.array(im)[..., 0], notes
      if mode == "RGB":
        return np.array(im), notes
      if mode in ("RGBA", "RGBa"):
        notes.append("alpha channel dropped")
        return np.array(im.convert("RGB") if mode == "RGBa" else im)[..., :3], notes
      if mode == "L":
        return np.array(im), notes
      if mode == "1":
        return np.array(im.convert("L")), notes
      if mode in ("LA", "La"):
        notes.append("alpha channel dropped")
        return np.array(im)[..., 0] if mode == "LA" else np.array(im.convert("L")), notes
      if mode.startswith("I;16") or mode == "I":
        array = np.array(im)
        return np.clip(array.astype(np.int64), 0, 65535).astype(np.uint16), notes
      if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        notes.append("palette image converted to RGB")
        if has_alpha:
          notes.append("alpha channel dropped")
        return np.array(im.convert("RGBA" if has_alpha else "RGB"))[..., :3], notes
      if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        notes.append(f"{mode} image converted to RGB")
        return np.array(im.convert("RGB")), notes
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except _PIL_ERRORS as e:
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  raise DataError(f"{path}: unsupported pixel format (pillow mode {mode!r}); expected an "
                  f"RGB, grayscale, palette or 16-bit integer image")


def read_rgb(path: str) -> np.ndarray:
  """The image at ``path`` as ``uint8 [H, W, 3]`` (conversions in the module doc)."""
  path = os.fspath(path)
  array, notes = _decode(path)
  if array.dtype == np.uint16:
    notes.append("16-bit image scaled to 8 bit (round(v / 257))")
    array = _to_8bit(array)
  if array.ndim == 2:
    notes.append("grayscale image converted to RGB")
    array = np.repeat(array[:, :, None], 3, axis=2)
  for note in notes:
    _log_once(path, note)
  return np.ascontiguousarray(array, dtype=np.uint8)


def read_mask(path: str) -> np.ndarray:
  """The mask at ``path`` as ``uint8 [H, W]``: 1 where the gray (or, for colour
  files, the first) channel is > 0 at its stored bit depth, else 0."""
  array, _ = _decode(path)
  if array.ndim == 3:
    array = array[..., 0]
  return (array > 0).astype(np.uint8)
