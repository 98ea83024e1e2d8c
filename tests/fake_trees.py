"""Tiny fake copies of the data set layouts, for tests (not a test module).

Every function writes random 48 x 64 (H x W) images into a new folder under
``root`` and returns that folder (the ``manual_dir`` to scan):

* :func:`make_mit_tree`: MIT Intrinsic Images, one folder per object;
* :func:`make_sir2_tree`: SIR², three sub-datasets of blended / transmission /
  reflection images;
* :func:`make_folder_tree`: the user's own folders of mixtures and layers, with
  a ``test/`` folder of triplets.

Pillow cannot write 16-bit colour PNGs, so :func:`write_png16` encodes them
itself (cycling through all five PNG row filters, which exercises the reader's
unfiltering).
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

H, W = 48, 64


def _paeth(a, b, c):
  p = a + b - c
  pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
  return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png16(path: str, array: np.ndarray) -> str:
  """16-bit PNG of ``array`` (uint16 [H, W] gray, [H, W, 2] gray+alpha, [H, W, 3]
  RGB or [H, W, 4] RGBA). Row ``i`` uses PNG filter type ``i % 5``."""
  array = np.asarray(array)
  if array.dtype != np.uint16:
    raise ValueError(f"write_png16 needs uint16, got {array.dtype}")
  channels = 1 if array.ndim == 2 else array.shape[2]
  colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  h, w = array.shape[:2]
  bpp = 2 * channels
  rows = array.astype(">u2").reshape(h, w * channels).view(np.uint8).astype(np.int32)
  lines = []
  for i in range(h):
    x = rows[i]
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])  # left
    b = rows[i - 1] if i else np.zeros_like(x)  # up
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])  # up-left
    ftype = i % 5
    prediction = (np.zeros_like(x), a, b, (a + b) // 2, _paeth(a, b, c))[ftype]
    lines.append(bytes([ftype]) + ((x - prediction) % 256).astype(np.uint8).tobytes())

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(lines))) + chunk(b"IEND", b""))
  return path


def _new_dir(root, name: str) -> str:
  path = os.path.join(os.fspath(root), name)
  os.makedirs(path, exist_ok=False)
  return path


def _rgb(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_mit_tree(root, objects=("apple", "box", "cup1", "cup2"), lights: int = 2,
                  sixteen_bit: bool = True, seed: int = 0) -> str:
  """MIT Intrinsic layout: ``<root>/mit/<object>/{original, reflectance, shading,
  mask, light01..}.png``.

  Reflectance R (RGB) and shading S (gray) are random; ``original = R * S`` in
  [0, 1] units (physically plausible for the multiplicative blend), light k is
  the original scaled by ``0.5 + 0.1 k``. With ``sixteen_bit`` the original,
  lights and reflectance are 16-bit RGB PNGs and the shading a 16-bit grayscale
  PNG (as in the real data set); otherwise all are 8-bit. The mask is an 8-bit
  grayscale PNG of 0 / 255 (an ellipse).
  """
  manual_dir = _new_dir(root, "mit")
  rng = np.random.default_rng(seed)
  top = 65535 if sixteen_bit else 255
  yy, xx = np.mgrid[:H, :W]
  for obj in objects:
    folder = _new_dir(manual_dir, obj)
    reflectance = rng.random((H, W, 3))
    shading = rng.random((H, W))
    original = reflectance * shading[..., None]

    def save(name, values):
      q = np.round(np.clip(values, 0.0, 1.0) * top)
      path = os.path.join(folder, name)
      if sixteen_bit:
        write_png16(path, q.astype(np.uint16))
      else:
        Image.fromarray(q.astype(np.uint8)).save(path)

    save("original.png", original)
    save("reflectance.png", reflectance)
    save("shading.png", shading)
    for k in range(1, lights + 1):
      save(f"light{k:02d}.png", original * (0.5 + 0.1 * k))
    mask = (((yy - H / 2) / (H / 3)) ** 2 + ((xx - W / 2) / (W / 3)) ** 2 <= 1.0)
    Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(folder, "mask.png"))
  return manual_dir


def make_sir2_tree(root, per_subdataset: int = 3, seed: int = 0) -> str:
  """SIR² layout: ``<root>/sir2/<SubDataset>/{blended, transmission_layer,
  reflection_layer}/<stem>.<ext>`` for the three sub-datasets.

  ``blended = clip(transmission + reflection, 0, 255)``. Image ``i`` is stored
  as JPEG when ``i`` is odd (blended as ``.jpg``, layers as ``.png`` so that the
  stems match across extensions) and as PNG otherwise.
  """
  manual_dir = _new_dir(root, "sir2")
  rng = np.random.default_rng(seed)
  for sub in ("SolidObjectDataset", "PostcardDataset", "WildSceneDataset"):
    dirs = [_new_dir(manual_dir, os.path.join(sub, d))
            for d in ("blended", "transmission_layer", "reflection_layer")]
    for i in range(per_subdataset):
      transmission = _rgb(rng)
      reflection = (_rgb(rng) // 3).astype(np.uint8)
      blended = np.clip(transmission.astype(np.int32) + reflection, 0, 255).astype(np.uint8)
      stem = f"{i + 1}"
      ext = ".jpg" if i % 2 else ".png"
      Image.fromarray(blended).save(os.path.join(dirs[0], stem + ext))
      Image.fromarray(transmission).save(os.path.join(dirs[1], stem + ".png"))
      Image.fromarray(reflection).save(os.path.join(dirs[2], stem + ".png"))
  return manual_dir


def make_folder_tree(root, layer_names=("background", "reflection"), num_train: int = 4,
                     num_test: int = 2, blend: str = "additive", seed: int = 0) -> str:
  """The user's own layout: ``<root>/folders/{mixtures, <layer names>}/`` with
  ``num_train`` independent (unpaired) images each, and
  ``<root>/folders/test/{mixtures, <layer names>}/`` with ``num_test`` triplets
  whose mixture is the blend of its layers (additive: clipped sum;
  multiplicative: product in [0, 1] units). Training image ``i`` is ``i:03d``.png,
  test triplet ``j`` is ``t{j}.png`` in every test subfolder.
  """
  manual_dir = _new_dir(root, "folders")
  rng = np.random.default_rng(seed)
  names = ("mixtures",) + tuple(layer_names)
  for name in names:
    folder = _new_dir(manual_dir, name)
    for i in range(num_train):
      Image.fromarray(_rgb(rng)).save(os.path.join(folder, f"{i:03d}.png"))
  test_dirs = [_new_dir(manual_dir, os.path.join("test", name)) for name in names]
  for j in range(num_test):
    layers = [_rgb(rng) for _ in layer_names]
    if blend == "additive":
      x = np.clip(np.sum([l.astype(np.int32) for l in layers], axis=0), 0, 255)
    else:
      x = np.round(np.prod([l / 255.0 for l in layers], axis=0) * 255.0)
    for folder, image in zip(test_dirs, [x.astype(np.uint8)] + layers):
      Image.fromarray(image).save(os.path.join(folder, f"t{j}.png"))
  return manual_dir
