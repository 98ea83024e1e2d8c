"""Synthetic shape layers (paper Sec. 5.1, 5.2, 5.4; Fig. 3a and Fig. 8a).

The distribution follows the authors' toy generator (``DatasetToy`` in
DreamtaleCore/USIS): every layer holds one filled shape on black, and the input
``x`` is an additive blend of the layers.

Per layer k (of kind ``shapes[k]``), on an ``S x S`` RGB canvas with values in [0, 1]:

* colour:  ``c = randint[50, 220)^3 / 255`` (one integer per channel);
* size:    ``s = (0.1 + 0.5 U) S``;
* anchor:  ``(a_x, a_y) = (0.6 U S, 0.6 U S)`` (two independent draws);
* square:   anchor is the top-left corner, side ``s``;
  circle:   anchor is the centre, radius ``s``;
  triangle: filled equilateral, centre = anchor, circumradius ``s``,
  rotation ``theta ~ U[0, 2 pi)``.

Grayscale (``color=False``, the authors' ``use_color`` off path): every weighted layer
is converted to gray, ``0.299 R + 0.587 G + 0.114 B`` (OpenCV's BGR2GRAY on the
channel order it was drawn in), and repeated to 3 channels; then ``x`` is their sum.

Shapes may extend past the border; they are clipped to the image. Rasterisation
samples pixel centres: pixel (i, j) (row i, column j) is inside when its centre
``(j + 0.5, i + 0.5)`` is inside the shape.

Blend (ground-truth layers are the *weighted* layers, so ``x = sum_k layers[k]``):

* N = 2: ``a ~ U[0.2, 0.8]``, ``layers = (a L_1, (1 - a) L_2)``;
* N >= 3: ``layers = (L_1 / N, ..., L_N / N)``.

Random draws (numpy ``Generator`` seeded with ``[seed, split_id, domain, index]``):
``integers(50, 220, (N, 3))`` for the colours, then ``random((N, 4))`` for size,
a_x, a_y and a rotation angle of every layer (the angle is drawn for every kind,
only triangles use it), then, for N = 2, ``uniform(0.2, 0.8)`` for ``a``.

Unpaired training (Sec. 5.1: "we do not have the data triplet"): ``x`` and each
ground-truth layer come from independent draws (different ``domain`` in the seed),
each domain with its own shuffle per epoch. The test split holds triplets.

Only numpy is imported here (pillow is imported inside :func:`save_examples_png`).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import numpy as np

from sils_jax.data import sampling

SHAPES = ("square", "circle", "triangle")
SPLITS = {"train": 0, "test": 1}


def _check_shapes(shapes: Sequence[str]) -> tuple[str, ...]:
  if isinstance(shapes, str):
    raise ValueError(
        f"shapes must be a sequence of shape kinds, one per layer, got the string "
        f"{shapes!r}; allowed kinds: {SHAPES}")
  shapes = tuple(shapes)
  if len(shapes) < 2:
    raise ValueError(
        f"shapes must name at least 2 layers, got {shapes!r}; allowed kinds: {SHAPES}")
  for kind in shapes:
    if kind not in SHAPES:
      raise ValueError(f"unknown shape kind {kind!r} in shapes={shapes!r}; "
                       f"allowed kinds: {SHAPES}")
  return shapes


def _split_id(split: str) -> int:
  try:
    return SPLITS[split]
  except KeyError:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}") from None


def _check_image_size(image_size: int) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or image_size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
  return int(image_size)


def _draw_params(rng: np.random.Generator, shapes: tuple[str, ...], image_size: int):
  """Draws every random quantity of one image, in the documented order.

  Returns (colours [N, 3] in [50/255, 219/255], geometry [N, 4] of (size, a_x,
  a_y, angle) in pixels / radians, blend weights [N]).
  """
  n = len(shapes)
  colours = rng.integers(50, 220, size=(n, 3)) / 255.0
  u = rng.random((n, 4))
  geometry = np.stack([(0.1 + 0.5 * u[:, 0]) * image_size,  # size
                       0.6 * u[:, 1] * image_size,  # a_x
                       0.6 * u[:, 2] * image_size,  # a_y
                       2.0 * math.pi * u[:, 3]], axis=1)  # angle (triangles only)
  if n == 2:
    a = rng.uniform(0.2, 0.8)
    weights = np.array([a, 1.0 - a])
  else:
    weights = np.full(n, 1.0 / n)
  return colours, geometry, weights


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Column vector of row centres (y) and row vector of column centres (x)."""
  c = np.arange(image_size, dtype=np.float64) + 0.5
  c.flags.writeable = False  # shared by every call through the cache
  return c[:, None], c[None, :]


def shape_mask(kind: str, size: float, ax: float, ay: float, angle: float,
               image_size: int) -> np.ndarray:
  """Boolean [S, S] mask of pixels (row i, column j) whose centre (j + .5, i + .5)
  lies inside the shape. Each test is a 1-D computation on rows and on columns
  broadcast against each other (no loop over pixels)."""
  y, x = _pixel_centres(image_size)
  if kind == "square":
    # Half-open so that adjacent squares would tile without overlap.
    return ((y >= ay) & (y < ay + size)) & ((x >= ax) & (x < ax + size))
  if kind == "circle":
    return (y - ay) ** 2 + (x - ax) ** 2 <= size * size
  if kind == "triangle":
    t = angle + 2.0 * math.pi * np.arange(3) / 3.0
    vx, vy = ax + size * np.cos(t), ay + size * np.sin(t)
    inside = None
    for k in range(3):  # three half-planes (a loop over edges, not pixels)
      x0, y0, x1, y1 = vx[k], vy[k], vx[(k + 1) % 3], vy[(k + 1) % 3]
      # Vertices go counter-clockwise in (x, y), so the inside has cross >= 0:
      # (x1 - x0) (y - y0) - (y1 - y0) (x - x0) >= 0.
      edge = ((x1 - x0) * (y - y0)) >= ((y1 - y0) * (x - x0))
      inside = edge if inside is None else inside & edge
    return inside
  raise ValueError(f"unknown shape kind {kind!r}; allowed kinds: {SHAPES}")


GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as OpenCV's BGR2GRAY


def _layer_image(kind: str, colour: np.ndarray, geometry: np.ndarray, weight: float,
                 image_size: int, color: bool = True) -> np.ndarray:
  """[S, S, 3] float32: ``weight * colour`` on the shape (its gray value in every
  channel when ``color`` is False), exact zeros elsewhere."""
  size, ax, ay, angle = geometry
  mask = shape_mask(kind, size, ax, ay, angle, image_size).astype(np.float32)
  if not color:
    colour = np.full(3, float(GRAY_WEIGHTS @ colour))
  value = (weight * colour).astype(np.float32)
  out = np.empty((image_size, image_size, 3), np.float32)
  for c in range(3):  # per channel: ~8x faster than broadcasting a length-3 axis
    np.multiply(mask, value[c], out=out[..., c])
  return out


def _rng(seed: int, split: str, domain: int, index: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), _split_id(split), int(domain), int(index)])


def render_triplet(seed: int, split: str, domain: int, index: int, *,
                   image_size: int = 128,
                   shapes: Sequence[str] = ("square", "circle"), color: bool = True,
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Renders one (x, layers) triplet.

  Deterministic: ``rng = np.random.default_rng([seed, split_id, domain, index])``
  with ``split_id`` 0 for 'train' and 1 for 'test'.

  Returns:
    x: [S, S, 3] float32, equal to ``layers.sum(0)``.
    layers: [N, S, S, 3] float32, the weighted ground-truth layers.
  """
  shapes = _check_shapes(shapes)
  image_size = _check_image_size(image_size)
  rng = _rng(seed, split, domain, index)
  colours, geometry, weights = _draw_params(rng, shapes, image_size)
  layers = np.empty((len(shapes), image_size, image_size, 3), np.float32)
  for k, kind in enumerate(shapes):
    layers[k] = _layer_image(kind, colours[k], geometry[k], weights[k], image_size, color)
  x = layers[0].copy()
  for layer in layers[1:]:
    x += layer  # float32 sums, in layer order: x == sum of the layers
  return x, layers


def render_layer(seed: int, split: str, domain: int, index: int, layer: int, *,
                 image_size: int = 128,
                 shapes: Sequence[str] = ("square", "circle"), color: bool = True) -> np.ndarray:
  """``render_triplet(...)[1][layer]`` without rasterising the other layers."""
  shapes = _check_shapes(shapes)
  image_size = _check_image_size(image_size)
  if not 0 <= layer < len(shapes):
    raise ValueError(f"layer must be in [0, {len(shapes)}), got {layer}")
  rng = _rng(seed, split, domain, index)
  colours, geometry, weights = _draw_params(rng, shapes, image_size)
  return _layer_image(shapes[layer], colours[layer], geometry[layer], weights[layer],
                      image_size, color)


class SyntheticLayers:
  """Unpaired training data and paired test data of N shape layers.

  Training examples are unpaired: ``x`` (domain 0) and layer k (domain k + 1) are
  drawn independently and shuffled independently. Test examples are triplets
  (split 'test', domain 0). Everything is a pure function of the constructor
  arguments and of the step, so resuming at a step reproduces the same data.
  """

  def __init__(self, *, image_size: int = 128,
               shapes: Sequence[str] = ("square", "circle"),
               num_train: int = 4000, num_test: int = 1000, seed: int = 0, color: bool = True):
    self.image_size = _check_image_size(image_size)
    self.color = bool(color)
    self.shapes = _check_shapes(shapes)
    for name, value in (("num_train", num_train), ("num_test", num_test)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    self.num_train = int(num_train)
    self.num_test = int(num_test)
    self.seed = int(seed)

  @property
  def num_layers(self) -> int:
    return len(self.shapes)

  def __repr__(self) -> str:
    return (f"SyntheticLayers(image_size={self.image_size}, shapes={self.shapes}, "
            f"num_train={self.num_train}, num_test={self.num_test}, seed={self.seed}, color={self.color})")

  def train_indices(self, domain: int, positions: np.ndarray) -> np.ndarray:
    """Example index of domain ``domain`` at global example positions ``positions``
    (``sampling.example_indices``: independent shuffles per domain and epoch)."""
    return sampling.example_indices(self.seed, domain, positions, self.num_train)

  def train_batch(self, step: int, batch_size: int, *, shard_index: int = 0,
                  num_shards: int = 1, paired: bool = False) -> dict:
    """Unpaired training batch: {'x': [b,S,S,3], 'layers': [b,N,S,S,3]} float32.

    ``paired=True`` (only for the supervised upper bound) returns training
    triplets instead: the layers of row j are the ground truth of x[j].

    ``b = batch_size // num_shards``. Global example position ``p = step *
    batch_size + j``; domain d takes example ``perm_{d,e}[p % num_train]`` with
    ``e = p // num_train`` and ``perm_{d,e}`` the permutation from
    ``default_rng([seed, 7, d, e])``. Shard s takes rows [s b, (s + 1) b).
    """
    positions = sampling.shard_positions(step, batch_size, shard_index, num_shards)
    b = len(positions)
    s, n = self.image_size, self.num_layers
    x = np.empty((b, s, s, 3), np.float32)
    layers = np.empty((b, n, s, s, 3), np.float32)
    for row, i in enumerate(self.train_indices(0, positions)):
      x[row], true_layers = render_triplet(self.seed, "train", 0, i, image_size=s, shapes=self.shapes,
                                            color=self.color)
      if paired:
        layers[row] = true_layers
    if not paired:
      for k in range(n):
        for row, i in enumerate(self.train_indices(k + 1, positions)):
          layers[row, k] = render_layer(self.seed, "train", k + 1, i, k, image_size=s,
                                        shapes=self.shapes, color=self.color)
    return {"x": x, "layers": layers}

  def _test_range(self, start: int, stop: int) -> dict:
    s, n = self.image_size, self.num_layers
    count = stop - start
    x = np.empty((count, s, s, 3), np.float32)
    layers = np.empty((count, n, s, s, 3), np.float32)
    for row, i in enumerate(range(start, stop)):
      x[row], layers[row] = render_triplet(self.seed, "test", 0, i, image_size=s,
                                           shapes=self.shapes, color=self.color)
    return {"x": x, "layers": layers, "index": np.arange(start, stop, dtype=np.int64)}

  def test_batches(self, batch_size: int) -> Iterator[dict]:
    """Yields test triplets {'x', 'layers', 'index'} in index order; last may be smaller."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, self.num_test, batch_size):
      yield self._test_range(start, min(start + batch_size, self.num_test))

  def test_arrays(self, count: int | None = None) -> dict:
    """The first ``count`` (default: all) test triplets, stacked."""
    if count is None:
      count = self.num_test
    if not 0 <= count <= self.num_test:
      raise ValueError(f"count must be in [0, {self.num_test}], got {count}")
    return self._test_range(0, count)


def save_examples_png(path, data: SyntheticLayers, count: int = 4, *, step: int = 0,
                      pad: int = 2) -> str:
  """Writes a grid like the paper's Fig. 3a and returns ``path``.

  Rows: x, then each layer; columns: the ``count`` examples of
  ``data.train_batch(step, count)``. The split is unpaired, so a column's rows
  are independent draws, not a triplet (as in Fig. 3a: "non-triplet data").
  Rows are separated by ``pad`` white pixels.
  """
  from PIL import Image  # only this helper needs pillow

  batch = data.train_batch(step, count)
  rows = [batch["x"]] + [batch["layers"][:, k] for k in range(data.num_layers)]
  s = data.image_size
  height = len(rows) * s + (len(rows) + 1) * pad
  width = count * s + (count + 1) * pad
  grid = np.ones((height, width, 3), np.float32)
  for r, images in enumerate(rows):
    for c, image in enumerate(images):
      top, left = pad + r * (s + pad), pad + c * (s + pad)
      grid[top:top + s, left:left + s] = image
  Image.fromarray(np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)).save(path)
  return str(path)
