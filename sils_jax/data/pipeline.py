"""The input pipeline of prepared (TFDS) datasets: unpaired sampling, augmentation,
per-process sharding, test triplets.

``RecordLayers`` has the interface of ``synthetic.SyntheticLayers`` (``train_batch``,
``test_arrays``, ``num_layers``, ``num_test``), so the training loop, its prefetcher
and its evaluation treat every dataset alike, and it reads in the same order
(``sampling.py``): x from pool 0 (the ``train_x`` split) and layer k from pool k + 1
(``train_layer{k}``), each shuffled independently per epoch.

Augmentation (paper Sec. 4: "random scalings by factors within 0.8 ~ 1.2, random
croppings and random horizontal flippings"), for the example at global position p of
pool d, with ``u = default_rng([seed, 11, d, p]).random(4)``:

1. scale ``f = f0 * (lo + (hi - lo) u0)`` where ``f0 = base_size / min(H, W)`` (1 when
   ``base_size`` is 0), raised to ``size / min(H, W)`` if the crop would not fit;
   bilinear resize to ``(round(H f), round(W f))``;
2. crop ``size x size`` at top ``floor(u1 (H' - size + 1))``, left
   ``floor(u2 (W' - size + 1))``;
3. horizontal flip when ``u3 < 0.5``.

Without augmentation an image is resized so its shorter side is ``size`` and
centre-cropped. Test triplets are always treated so (shorter side ``eval_size``,
centre crop; masks by nearest neighbour), so they stack into one array.

Images are read as uint8 and returned as float32 in [0, 1]. Only numpy and pillow
are used: no TensorFlow.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from sils_jax.data import sampling

_AUGMENT_STREAM = 11


def _resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  resample = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def centre_view(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  """Resizes the shorter side to ``size`` and crops the centre ``size x size``."""
  h, w = image.shape[:2]
  f = size / min(h, w)
  nh, nw = max(size, round(h * f)), max(size, round(w * f))
  out = _resize(image, nh, nw, nearest)
  top, left = (nh - size) // 2, (nw - size) // 2
  return out[top:top + size, left:left + size]


def augment(image: np.ndarray, size: int, u: np.ndarray, *, scale_range: Sequence[float] = (0.8, 1.2),
            base_size: int = 0) -> np.ndarray:
  """Random scale, crop and flip of a uint8 [H, W, 3] image from the uniforms ``u`` (4)."""
  h, w = image.shape[:2]
  lo, hi = scale_range
  f0 = base_size / min(h, w) if base_size else 1.0
  f = max(f0 * (lo + (hi - lo) * u[0]), size / min(h, w))
  nh, nw = max(size, round(h * f)), max(size, round(w * f))
  out = _resize(image, nh, nw)
  top = int(u[1] * (nh - size + 1))
  left = int(u[2] * (nw - size + 1))
  out = out[top:top + size, left:left + size]
  return out[:, ::-1] if u[3] < 0.5 else out


def to_float(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 255.0


class RecordLayers:
  """Unpaired training batches and paired test triplets of a prepared dataset.

  ``sources``: split name -> random-access sequence of examples ``{'image', 'layers',
  'mask', 'key'}`` (``builders.data_sources``), with splits ``train_x``,
  ``train_layer0`` ... ``train_layer{N-1}`` and optionally ``test``.
  """

  def __init__(self, sources: Mapping[str, Sequence], *, num_layers: int, image_size: int, seed: int = 0,
               augment: bool = True, scale_range: Sequence[float] = (0.8, 1.2), base_size: int = 0,
               eval_size: int = 0, name: str = "dataset"):
    self.name = name
    self.num_layers = int(num_layers)
    pools = ["train_x"] + [f"train_layer{k}" for k in range(self.num_layers)]
    missing = [p for p in pools if p not in sources]
    if missing:
      raise ValueError(f"{name}: the prepared dataset has no split(s) {missing} for {self.num_layers} "
                       f"layers (it has {sorted(sources)}); was it built for another number of layers?")
    self.pools = [sources[p] for p in pools]
    for p, src in zip(pools, self.pools):
      if len(src) == 0:
        raise ValueError(f"{name}: split {p!r} is empty")
    self.test_source = sources.get("test")
    self.num_test = len(self.test_source) if self.test_source is not None else 0
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.augment = bool(augment)
    self.scale_range = tuple(float(v) for v in scale_range)
    self.base_size = int(base_size)
    self.eval_size = int(eval_size) or self.image_size
    self._test_cache: dict | None = None

  def __repr__(self) -> str:
    return (f"RecordLayers({self.name}: {len(self.pools[0])} inputs, "
            f"{[len(p) for p in self.pools[1:]]} layer images, {self.num_test} test triplets)")

  def _view(self, image: np.ndarray, domain: int, position: int) -> np.ndarray:
    if self.augment:
      u = np.random.default_rng([self.seed, _AUGMENT_STREAM, domain, int(position)]).random(4)
      out = augment(image, self.image_size, u, scale_range=self.scale_range, base_size=self.base_size)
    else:
      out = centre_view(image, self.image_size)
    return to_float(out)

  def train_batch(self, step: int, batch_size: int, *, shard_index: int = 0, num_shards: int = 1,
                  paired: bool = False) -> dict:
    """Unpaired batch {'x': [b,S,S,3], 'layers': [b,N,S,S,3]} float32 (see the module doc)."""
    if paired:
      raise ValueError(f"{self.name}: config.objective='supervised' needs paired training triplets, "
                       "but real datasets are split unpaired (Sec. 5.1): use objective='unsupervised'")
    positions = sampling.shard_positions(step, batch_size, shard_index, num_shards)
    s, n, b = self.image_size, self.num_layers, len(positions)
    x = np.empty((b, s, s, 3), np.float32)
    layers = np.empty((b, n, s, s, 3), np.float32)
    for domain, pool in enumerate(self.pools):
      idx = sampling.example_indices(self.seed, domain, positions, len(pool))
      for row, (i, p) in enumerate(zip(idx, positions)):
        view = self._view(pool[int(i)]["image"], domain, p)
        if domain == 0:
          x[row] = view
        else:
          layers[row, domain - 1] = view
    return {"x": x, "layers": layers}

  def _all_test(self) -> dict:
    if self._test_cache is None:
      s = self.eval_size
      xs, ls, ms, keys = [], [], [], []
      for i in range(self.num_test):
        ex = self.test_source[i]
        xs.append(to_float(centre_view(ex["image"], s)))
        ls.append(np.stack([to_float(centre_view(l, s)) for l in ex["layers"]]))
        mask = ex["mask"]
        ms.append(centre_view(mask, s, nearest=True).astype(np.float32) if mask.size else np.ones((s, s), np.float32))
        key = ex["key"]
        keys.append(key.decode() if isinstance(key, bytes) else str(key))
      empty = np.zeros((0, s, s), np.float32)
      self._test_cache = {"x": np.stack(xs) if xs else empty[..., None].repeat(3, -1),
                          "layers": np.stack(ls) if ls else np.zeros((0, self.num_layers, s, s, 3), np.float32),
                          "mask": np.stack(ms) if ms else empty, "key": np.array(keys, dtype=object)}
    return self._test_cache

  def test_arrays(self, count: int | None = None) -> dict:
    """The first ``count`` (default: all) test triplets: {'x', 'layers', 'mask', 'key', 'index'}."""
    count = self.num_test if count is None else count
    if not 0 <= count <= self.num_test:
      raise ValueError(f"count must be in [0, {self.num_test}], got {count}")
    t = self._all_test()
    return {**{k: v[:count] for k, v in t.items()}, "index": np.arange(count, dtype=np.int64)}
