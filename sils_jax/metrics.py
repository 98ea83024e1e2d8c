"""Evaluation metrics (pure jax.numpy functions).

The paper reports

* "image MSE x 100" per layer on the synthetic set (Sec. 5.2, Fig. 3c): the mean
  squared error of each image over its pixels and channels, averaged over the test
  images. :func:`mse` returns the plain MSE; multiply by 100 to compare with the paper.
* LMSE on the MIT intrinsic images (Table 1): :func:`lmse`, :func:`mit_lmse`
  (Grosse et al. 2009, "Ground truth dataset and baseline evaluations for intrinsic
  image algorithms").
* PSNR and SSIM for reflection removal (Table 2): :func:`psnr`, :func:`ssim`, with
  the usual conventions (data range 1, Gaussian window 11, sigma 1.5), via dm-pix.

Every image function takes one image [H, W, C] or a batch [N, H, W, C] of float
images with values in [0, 1] and returns a float32 scalar: the mean over the batch of
the per-image scores. Integer images (e.g. uint8 in 0..255) are rejected with a
ValueError rather than scored on the wrong scale. Shape and dtype checks are static,
so the functions are pure and jittable (``lmse``'s ``window`` is a static argument).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np


def _check_float(x, fn: str, arg: str) -> jnp.ndarray:
  """``jnp.asarray(x)``; raises a ValueError unless its dtype is floating."""
  dtype = getattr(x, "dtype", None)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{fn}: {arg} must be a float image with values in [0, 1], got dtype "
        f"{dtype if dtype is not None else x.dtype} (shape {x.shape}); convert it first, "
        f"e.g. x.astype(np.float32) / 255 for uint8 data")
  return x


def _image_pair(a, b, fn: str, names: tuple[str, str] = ("a", "b")):
  """Checks two images [H, W, C] or batches [N, H, W, C] -> float32 [N, H, W, C] x 2."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.ndim not in (3, 4):
    raise ValueError(
        f"{fn} expects {names[0]} and {names[1]} as two images [H, W, C] or two batches "
        f"[N, H, W, C] of the same shape, got shapes {a.shape} and {b.shape}")
  a, b = _check_float(a, fn, names[0]), _check_float(b, fn, names[1])
  if a.ndim == 3:
    a, b = a[None], b[None]
  return a.astype(jnp.float32), b.astype(jnp.float32)


def mse(a, b) -> jnp.ndarray:
  """Mean squared error per image, averaged over the batch.

  ``mse(a, b) = 1/N sum_n 1/(H W C) sum_{h,w,c} (a[n,h,w,c] - b[n,h,w,c])^2``

  Args:
    a, b: images [H, W, C] or [N, H, W, C] with values in [0, 1]; same shape.

  Returns:
    A float32 scalar. Pure and jittable (shape checks are static).

  Raises:
    ValueError: on shapes other than the above, or a non-float dtype (uint8 images
      must be converted to float in [0, 1] first).
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.ndim not in (3, 4):
    raise ValueError(
        f"mse expects two images [H, W, C] or two batches [N, H, W, C] of the same "
        f"shape, got shapes {a.shape} and {b.shape}")
  a, b = _check_float(a, "mse", "a"), _check_float(b, "mse", "b")
  diff = a.astype(jnp.float32) - b.astype(jnp.float32)
  per_image = jnp.mean(jnp.square(diff), axis=(-3, -2, -1))
  return jnp.mean(per_image)


# mse of every layer: [B, N, H, W, C] x 2 -> [N] (jitted so that large eval sets
# are reduced in one fused pass, without materialising per-layer copies).
_layer_mses = jax.jit(jax.vmap(mse, in_axes=(1, 1)))
_baseline_mses = jax.jit(jax.vmap(mse, in_axes=(None, 1)))


def _check_layers(pred_layers, true_layers, names: Sequence[str], what: str):
  if pred_layers.shape != true_layers.shape or pred_layers.ndim != 5:
    raise ValueError(
        f"{what} expects predicted and true layers [B, N, H, W, C] of the same shape, "
        f"got shapes {pred_layers.shape} and {true_layers.shape}")
  _check_float(pred_layers, what, "pred_layers")
  _check_float(true_layers, what, "true_layers")
  if pred_layers.shape[1] != len(names):
    raise ValueError(
        f"{what}: layers have N={pred_layers.shape[1]} (axis 1 of shape "
        f"{pred_layers.shape}) but {len(names)} names were given: {tuple(names)}")


def per_layer_mse(pred_layers, true_layers, names: Sequence[str]) -> dict:
  """``{names[k]: mse(pred_layers[:, k], true_layers[:, k])}`` for [B, N, H, W, C] inputs."""
  pred_layers, true_layers = jnp.asarray(pred_layers), jnp.asarray(true_layers)
  _check_layers(pred_layers, true_layers, names, "per_layer_mse")
  scores = _layer_mses(pred_layers, true_layers)
  return {name: scores[k] for k, name in enumerate(names)}


def trivial_baselines(x, true_layers, names: Sequence[str]) -> dict:
  """Per-layer MSE of the two trivial separations of ``x`` into N layers.

  * ``'x_over_n'``: every layer predicted as ``x / N`` (exact for the additive
    blend when all layers are equal);
  * ``'zero'``: every layer predicted as 0 (the score is the layer's mean square).

  Args:
    x: inputs [B, H, W, C].
    true_layers: ground-truth layers [B, N, H, W, C].
    names: N layer names.

  Returns:
    ``{'x_over_n': {name: mse}, 'zero': {name: mse}}``.
  """
  x, true_layers = jnp.asarray(x), jnp.asarray(true_layers)
  if x.ndim != 4 or true_layers.ndim != 5 or x.shape[0] != true_layers.shape[0] \
      or x.shape[1:] != true_layers.shape[2:]:
    raise ValueError(
        f"trivial_baselines expects x [B, H, W, C] and true_layers [B, N, H, W, C], "
        f"got shapes {x.shape} and {true_layers.shape}")
  n = true_layers.shape[1]
  if n != len(names):
    raise ValueError(
        f"trivial_baselines: true_layers have N={n} (axis 1 of shape "
        f"{true_layers.shape}) but {len(names)} names were given: {tuple(names)}")
  x = _check_float(x, "trivial_baselines", "x").astype(jnp.float32)
  _check_float(true_layers, "trivial_baselines", "true_layers")
  x_over_n = _baseline_mses(x / n, true_layers)
  zero = _baseline_mses(jnp.zeros_like(x), true_layers)
  return {
      "x_over_n": {name: x_over_n[k] for k, name in enumerate(names)},
      "zero": {name: zero[k] for k, name in enumerate(names)},
  }


def order_invariant_mse(pred_layers, true_layers) -> jnp.ndarray:
  """MSE under the best assignment of predicted to true layers, per image:

      mean_b  min_pi  mean_k  mse(pred[b, pi(k)], true[b, k])

  over all permutations pi of the N layers. A method that separates but swaps the
  streams scores as well as one in order; compared with the mean of
  ``per_layer_mse`` it shows whether a poor score is a wrong split or a swapped one.
  """
  pred_layers, true_layers = jnp.asarray(pred_layers, jnp.float32), jnp.asarray(true_layers, jnp.float32)
  _check_layers(pred_layers, true_layers, [str(k) for k in range(pred_layers.shape[1])], "order_invariant_mse")
  n = pred_layers.shape[1]
  # pairwise[b, j, k] = mse(pred[b, j], true[b, k])
  pairwise = jnp.stack([jnp.stack([jnp.mean(jnp.square(pred_layers[:, j] - true_layers[:, k]), axis=(1, 2, 3))
                                   for k in range(n)], axis=1) for j in range(n)], axis=1)
  perms = jnp.asarray(list(itertools.permutations(range(n))))  # [P, N]: pi(k) = perms[p, k]
  per_perm = jnp.mean(pairwise[:, perms, jnp.arange(n)], axis=-1)  # [B, P]
  return jnp.mean(jnp.min(per_perm, axis=1))


def leakage(pred_layers, true_layers, x) -> jnp.ndarray:
  """How much of the other layers each predicted layer holds, per layer [N]:

      leak_k = sum_{R_k} |pred_k|^2 / sum_{R_k} |x|^2,   R_k = (U_{j != k} M_j) \\ M_k

  with M_j the pixels where true layer j is non-zero (any channel), summed over the
  batch. 0 for a clean split, 0.25 for "each layer = x/2" (two layers), 1 for a copy
  of x; NaN where R_k is empty in every image (no pixel to judge).
  """
  pred_layers, true_layers = jnp.asarray(pred_layers, jnp.float32), jnp.asarray(true_layers, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  _check_layers(pred_layers, true_layers, [str(k) for k in range(pred_layers.shape[1])], "leakage")
  masks = jnp.any(true_layers > 0, axis=-1)  # [B, N, H, W]
  n = masks.shape[1]
  others = jnp.stack([jnp.any(jnp.delete(masks, k, axis=1, assume_unique_indices=True), axis=1)
                      for k in range(n)], axis=1)
  region = (others & ~masks)[..., None]  # [B, N, H, W, 1]
  energy = jnp.sum(jnp.where(region, jnp.square(pred_layers), 0.0), axis=(0, 2, 3, 4))
  reference = jnp.sum(jnp.where(region, jnp.square(x)[:, None], 0.0), axis=(0, 2, 3, 4))
  return jnp.where(reference > 0, energy / jnp.where(reference > 0, reference, 1.0), jnp.nan)


# ---------------------------------------------------------------------------
# LMSE (Grosse et al. 2009, MIT intrinsic images benchmark; paper Table 1).


def _lmse_mask(mask, shape, fn: str) -> jnp.ndarray:
  """mask [H, W], [N, H, W] (optionally with a trailing 1) -> float32 [N, H, W]."""
  n, h, w, _ = shape
  if mask is None:
    return jnp.ones((n, h, w), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.ndim >= 1 and mask.shape[-1] == 1 and mask.shape[:-1] in ((h, w), (n, h, w)):
    mask = mask[..., 0]
  if mask.shape not in ((h, w), (n, h, w)):
    raise ValueError(
        f"{fn}: mask must have shape (H, W) = {(h, w)} or (N, H, W) = {(n, h, w)} "
        f"(optionally with a trailing channel of 1) for images of shape (N, H, W, C) = "
        f"{shape}, got shape {mask.shape}")
  if not (jnp.issubdtype(mask.dtype, jnp.floating) or jnp.issubdtype(mask.dtype, jnp.integer)
          or mask.dtype == jnp.bool_):
    raise ValueError(f"{fn}: mask must be bool or numeric, got dtype {mask.dtype}")
  return jnp.broadcast_to(mask.astype(jnp.float32), (n, h, w))


def _window_index(size: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, window] pixel indices of the windows that fit entirely in ``size``."""
  starts = np.arange(0, size - window + 1, shift)
  return starts[:, None] + np.arange(window)[None, :]


def _local_error(correct, estimate, mask, window: int, shift: int) -> jnp.ndarray:
  """The MIT ``local_error`` of [..., H, W] arrays -> [...] (broadcasting leading axes).

  All windows are extracted at once with a static gather: ``x[..., rows, :][..., cols]``
  is ``[..., I, window, J, window]`` for I x J windows.
  """
  rows = _window_index(correct.shape[-2], window, shift)
  cols = _window_index(correct.shape[-1], window, shift)

  def windows(x):
    return x[..., rows, :][..., cols]  # [..., I, w, J, w]

  c, e, m = windows(correct), windows(estimate), windows(mask)
  sum_win = lambda x: jnp.sum(x, axis=(-3, -1))  # [..., I, J]
  cem, eem = sum_win(c * e * m), sum_win(e * e * m)
  valid = eem > 1e-5
  scale = jnp.where(valid, cem / jnp.where(valid, eem, 1.0), 0.0)
  residual = c - scale[..., :, None, :, None] * e
  ssq = jnp.sum(sum_win(m * residual * residual), axis=(-2, -1))
  total = jnp.sum(sum_win(m * c * c), axis=(-2, -1))
  return ssq / total


_LMSE_CHUNK = 8


def lmse(correct, estimate, mask=None, window: int = 20) -> jnp.ndarray:
  """Local scale-invariant MSE of Grosse et al. (2009), averaged over the batch.

  The MIT intrinsic-images ``local_error``: square windows of ``window`` pixels,
  shifted by ``window // 2`` (20 and 10 by default); only windows that fit entirely
  in the image are used, so when ``H - window`` or ``W - window`` is not a multiple of
  the shift the last rows / columns are not scored. For every window ``w``

  ``a_w = sum_w(c e m) / sum_w(e^2 m)``   (``a_w = 0`` when ``sum_w(e^2 m) <= 1e-5``),
  ``err_w = sum_w m (c - a_w e)^2``,

(``sum_w`` sums over the pixels of window ``w``), and the score of an image is
  ``(sum over windows of err_w) / (sum over windows of sum_w(m c^2))``, so pixels in
  overlapping windows count several times, as in the reference.
  It is 0 for ``estimate = k * correct`` (any k > 0) and 1 for ``estimate = 0``.

  The MIT code scores one channel per image. For C > 1 this function scores each
  channel on its own (its own scale per window and channel) and averages the channel
  scores; :func:`mit_lmse` converts to gray first, as the benchmark does.

  Args:
    correct: ground truth [H, W, C] or [N, H, W, C], float in [0, 1].
    estimate: prediction of the same shape.
    mask: None (all pixels valid) or weights (1 = valid, 0 = ignored; bool or
      numeric) of shape [H, W] (shared by the batch) or [N, H, W], either optionally
      with a trailing axis of size 1.
    window: window size in pixels (static); the shift is ``window // 2``. H and W must
      be at least ``window``.

  Returns:
    A float32 scalar, the mean over images of the per-image score. An image (or
    channel) whose masked windows hold no signal (``sum m c^2 = 0``) has the
    reference's undefined score 0/0 = NaN.
  """
  correct, estimate = _image_pair(correct, estimate, "lmse", ("correct", "estimate"))
  n, h, w, _ = correct.shape
  if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 2:
    raise ValueError(f"lmse: window must be an int >= 2 (the shift is window // 2), "
                     f"got {window!r}")
  if h < window or w < window:
    raise ValueError(
        f"lmse: images of shape {correct.shape} (N, H, W, C) are smaller than one "
        f"{window}x{window} window; use a smaller window or larger images")
  m = _lmse_mask(mask, correct.shape, "lmse")
  window = int(window)

  def per_image(args):  # [H, W, C] x 2, [H, W] -> [C]
    c, e, m = args
    return _local_error(jnp.moveaxis(c, -1, 0), jnp.moveaxis(e, -1, 0), m[None],
                        window, window // 2)

  # Images in chunks of _LMSE_CHUNK: the extracted windows hold ~4x the pixels of
  # each chunk, so memory stays bounded for large evaluation sets.
  per_channel = jax.lax.map(per_image, (correct, estimate, m),
                            batch_size=min(n, _LMSE_CHUNK))  # [N, C]
  return jnp.mean(per_channel)


def mit_lmse(albedo_true, albedo_pred, shading_true, shading_pred, mask=None) -> jnp.ndarray:
  """MIT intrinsic-images score: ``0.5 LMSE(albedo) + 0.5 LMSE(shading)``.

  As in the benchmark (window 20, shift 10), colour images are converted to gray by
  averaging their channels before scoring (a 1-channel image is unchanged). The
  paper's Table 1 calls this "LMSE Total".

  Args:
    albedo_true, albedo_pred: [H, W, C] or [N, H, W, C] float in [0, 1].
    shading_true, shading_pred: same H, W (and N), 1 or C channels.
    mask: as in :func:`lmse`, shared by albedo and shading.

  Returns:
    A float32 scalar: the mean over images of the per-image score.
  """
  fn = "mit_lmse"
  albedo_true, albedo_pred = _image_pair(albedo_true, albedo_pred, fn,
                                         ("albedo_true", "albedo_pred"))
  shading_true, shading_pred = _image_pair(shading_true, shading_pred, fn,
                                           ("shading_true", "shading_pred"))
  if albedo_true.shape[:3] != shading_true.shape[:3]:
    raise ValueError(
        f"{fn}: albedo and shading must have the same (N,) H, W, got shapes "
        f"{albedo_true.shape} and {shading_true.shape} (with a batch axis added)")
  gray = lambda x: jnp.mean(x, axis=-1, keepdims=True)
  return (0.5 * lmse(gray(albedo_true), gray(albedo_pred), mask)
          + 0.5 * lmse(gray(shading_true), gray(shading_pred), mask))


# ---------------------------------------------------------------------------
# PSNR / SSIM (reflection removal; paper Table 2).


def psnr(a, b) -> jnp.ndarray:
  """Peak signal-to-noise ratio in dB, data range 1, averaged over the batch.

  ``psnr = -10 log10(mse)`` per image (``dm_pix.psnr``; equals skimage's
  ``peak_signal_noise_ratio(a, b, data_range=1.0)``); a batch scores the mean of the
  per-image PSNRs (not the PSNR of the mean MSE). Identical images give +inf.

  Args:
    a, b: [H, W, C] or [N, H, W, C] float in [0, 1], same shape.
  """
  a, b = _image_pair(a, b, "psnr")
  return jnp.mean(pix.psnr(a, b))


SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5


def ssim(a, b) -> jnp.ndarray:
  """Structural similarity (Wang et al. 2004), averaged over the batch.

  The reflection-removal convention: Gaussian window of 11 taps with sigma 1.5, data
  range 1, K1 = 0.01, K2 = 0.03, per-channel SSIM maps averaged over the valid
  (unpadded) pixels and the channels -- ``dm_pix.ssim(a, b, max_val=1.0,
  filter_size=11, filter_sigma=1.5)``, equal to skimage's ``structural_similarity(a,
  b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
  channel_axis=-1)`` (whose defaults differ).

  Args:
    a, b: [H, W, C] or [N, H, W, C] float in [0, 1], same shape, H and W >= 11.
  """
  a, b = _image_pair(a, b, "ssim")
  if min(a.shape[1:3]) < SSIM_FILTER_SIZE:
    raise ValueError(f"ssim: images of shape {a.shape} (N, H, W, C) are smaller than "
                     f"the {SSIM_FILTER_SIZE}x{SSIM_FILTER_SIZE} Gaussian window")
  return jnp.mean(pix.ssim(a, b, max_val=1.0, filter_size=SSIM_FILTER_SIZE,
                           filter_sigma=SSIM_FILTER_SIGMA))


_METRICS = {
    "mse": jax.jit(mse),
    "lmse": jax.jit(lmse),
    "psnr": jax.jit(psnr),
    "ssim": jax.jit(ssim),
}


def per_layer_metrics(pred_layers, true_layers, names: Sequence[str], mask=None,
                      which: Sequence[str] = ("mse", "lmse", "psnr", "ssim")) -> dict:
  """``{name: {metric: float}}`` of every layer of [B, N, H, W, C] predictions.

  ``out[names[k]][metric] = metric(pred_layers[:, k], true_layers[:, k])`` for the
  metrics in ``which`` (``'mse'``, ``'lmse'`` (window 20), ``'psnr'``, ``'ssim'``), as
  Python floats (batch means). ``mask`` ([H, W] or [B, H, W], see :func:`lmse`) is used
  by LMSE only; MSE, PSNR and SSIM score whole images, as in the papers they follow.
  """
  pred_layers, true_layers = jnp.asarray(pred_layers), jnp.asarray(true_layers)
  _check_layers(pred_layers, true_layers, names, "per_layer_metrics")
  which = (which,) if isinstance(which, str) else tuple(which)
  unknown = [w for w in which if w not in _METRICS]
  if unknown:
    raise ValueError(f"per_layer_metrics: unknown metrics {unknown} in which={which}; "
                     f"available: {tuple(_METRICS)}")
  if mask is not None and "lmse" in which:
    b, _, h, w, c = pred_layers.shape
    _lmse_mask(mask, (b, h, w, c), "per_layer_metrics")  # fail before computing
  out = {}
  for k, name in enumerate(names):
    pred, true = pred_layers[:, k], true_layers[:, k]
    out[name] = {}
    for metric in which:
      if metric == "lmse":
        # lmse(correct, estimate): the ground truth comes first.
        value = _METRICS[metric](true, pred, mask)
      else:
        value = _METRICS[metric](pred, true)
      out[name][metric] = float(value)
  return out
