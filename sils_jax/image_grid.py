"""Image grids as PNG (numpy + pillow; no TensorFlow)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def to_uint8(img) -> np.ndarray:
  """Float image(s) in [0, 1] (clipped) -> uint8."""
  return (np.clip(np.asarray(img, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """rows: each [B, H, W, 3] in [0, 1] -> one uint8 [R*(H+pad)+pad, B*(W+pad)+pad, 3] image."""
  rows = [np.asarray(r) for r in rows]
  b, h, w, c = rows[0].shape
  for r in rows:
    if r.shape != (b, h, w, c):
      raise ValueError(f"all grid rows must have shape {(b, h, w, c)}, got {r.shape}")
  out = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, c), 255, np.uint8)
  for i, r in enumerate(rows):
    for j in range(b):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = to_uint8(r[j])
  return out


def separation_grid(x, pred, true, recomposed) -> np.ndarray:
  """The sample grid of a separation: columns are images; rows are x [B, H, W, 3], each
  predicted layer of pred [B, N, H, W, 3], each true layer of true, and the re-blend."""
  n = pred.shape[1]
  return make_grid([x] + [pred[:, i] for i in range(n)] + [true[:, i] for i in range(n)] + [recomposed])


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 (or [0, 1] float) HxWx3 image; the file appears whole or not at all."""
  from PIL import Image
  if image.dtype != np.uint8:
    image = to_uint8(image)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
