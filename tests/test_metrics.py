"""Tests for sils_jax.metrics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from sils_jax import metrics


def reference_mse(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim == 3:
    a, b = a[None], b[None]
  return np.mean([np.mean((u - v) ** 2) for u, v in zip(a, b)])


_unit = st.floats(0, 1, width=32)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_mse_matches_numpy_reference(data):
  shape = data.draw(hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=6))
  a = data.draw(hnp.arrays(np.float32, shape, elements=_unit))
  b = data.draw(hnp.arrays(np.float32, shape, elements=_unit))
  got = metrics.mse(a, b)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), reference_mse(a, b), rtol=1e-5, atol=1e-7)


def test_mse_batch_is_mean_of_single_images():
  rng = np.random.default_rng(0)
  a, b = rng.random((5, 8, 6, 3), np.float32), rng.random((5, 8, 6, 3), np.float32)
  singles = [float(metrics.mse(a[i], b[i])) for i in range(5)]
  np.testing.assert_allclose(float(metrics.mse(a, b)), np.mean(singles), rtol=1e-6)
  np.testing.assert_allclose(float(metrics.mse(a[:1], b[:1])), singles[0], rtol=1e-6)
  assert float(metrics.mse(a, a)) == 0.0
  # Symmetric, and jittable with the same result.
  assert float(metrics.mse(a, b)) == pytest.approx(float(metrics.mse(b, a)))
  np.testing.assert_allclose(float(jax.jit(metrics.mse)(a, b)), float(metrics.mse(a, b)),
                             rtol=1e-6)


def test_mse_known_value():
  a = np.zeros((2, 4, 4, 3), np.float32)
  b = np.full((2, 4, 4, 3), 0.5, np.float32)
  b[1] = 0.1
  np.testing.assert_allclose(float(metrics.mse(a, b)), (0.25 + 0.01) / 2, rtol=1e-6)


@pytest.mark.parametrize("shape_a, shape_b", [
    ((4, 4, 3), (4, 4, 1)),
    ((2, 4, 4, 3), (4, 4, 3)),
    ((4, 4), (4, 4)),
    ((1, 2, 4, 4, 3), (1, 2, 4, 4, 3)),
])
def test_mse_shape_errors_name_the_shapes(shape_a, shape_b):
  with pytest.raises(ValueError) as err:
    metrics.mse(np.zeros(shape_a), np.zeros(shape_b))
  assert str(shape_a) in str(err.value) and str(shape_b) in str(err.value)


def test_per_layer_mse():
  rng = np.random.default_rng(1)
  pred = rng.random((3, 2, 8, 8, 3), np.float32)
  true = rng.random((3, 2, 8, 8, 3), np.float32)
  scores = metrics.per_layer_mse(pred, true, ("square", "circle"))
  assert list(scores) == ["square", "circle"]
  for k, name in enumerate(("square", "circle")):
    np.testing.assert_allclose(float(scores[name]), reference_mse(pred[:, k], true[:, k]),
                               rtol=1e-5)
  with pytest.raises(ValueError, match="N=2.*3 names"):
    metrics.per_layer_mse(pred, true, ("a", "b", "c"))
  with pytest.raises(ValueError, match=r"\(3, 2, 8, 8, 3\)"):
    metrics.per_layer_mse(pred, true[:, :, :4], ("a", "b"))
  with pytest.raises(ValueError, match="B, N, H, W, C"):
    metrics.per_layer_mse(pred[:, 0], true[:, 0], ("a", "b"))


@pytest.mark.parametrize("n", [2, 3])
def test_trivial_baselines(n):
  rng = np.random.default_rng(n)
  layers = rng.random((4, n, 8, 8, 3), np.float32) / n
  x = layers.sum(1)
  names = tuple(f"layer{k}" for k in range(n))
  scores = metrics.trivial_baselines(x, layers, names)
  assert set(scores) == {"x_over_n", "zero"}
  for k, name in enumerate(names):
    np.testing.assert_allclose(float(scores["x_over_n"][name]),
                               reference_mse(np.broadcast_to(x / n, x.shape), layers[:, k]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(scores["zero"][name]),
                               np.mean(layers[:, k].astype(np.float64) ** 2), rtol=1e-5)
  # Identical layers are split exactly by x / N.
  same = np.repeat(layers[:, :1], n, axis=1)
  exact = metrics.trivial_baselines(same.sum(1), same, names)
  for name in names:
    assert float(exact["x_over_n"][name]) < 1e-12


def test_trivial_baselines_shape_errors():
  x = np.zeros((2, 8, 8, 3), np.float32)
  layers = np.zeros((2, 2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="N=2"):
    metrics.trivial_baselines(x, layers, ("a",))
  with pytest.raises(ValueError, match=r"\(2, 8, 8, 3\)"):
    metrics.trivial_baselines(x, layers[:, :, :4], ("a", "b"))
  with pytest.raises(ValueError, match="x \\[B, H, W, C\\]"):
    metrics.trivial_baselines(x[0], layers, ("a", "b"))


# ---------------------------------------------------------------------------
# LMSE: a direct float64 transcription of the MIT intrinsic-images reference
# (Grosse et al. 2009, ``ssq_error`` and ``local_error``), loops over windows.


def reference_ssq_error(correct, estimate, mask):
  assert correct.ndim == 2
  if np.sum(estimate ** 2 * mask) > 1e-5:
    alpha = np.sum(correct * estimate * mask) / np.sum(estimate ** 2 * mask)
  else:
    alpha = 0.
  return np.sum(mask * (correct - alpha * estimate) ** 2)


def reference_local_error(correct, estimate, mask, window_size, window_shift):
  m, n = correct.shape[:2]
  ssq = total = 0.
  for i in range(0, m - window_size + 1, window_shift):
    for j in range(0, n - window_size + 1, window_shift):
      correct_curr = correct[i:i + window_size, j:j + window_size]
      estimate_curr = estimate[i:i + window_size, j:j + window_size]
      mask_curr = mask[i:i + window_size, j:j + window_size]
      ssq += reference_ssq_error(correct_curr, estimate_curr, mask_curr)
      total += np.sum(mask_curr * correct_curr ** 2)
  with np.errstate(invalid="ignore"):
    return ssq / total


def reference_lmse(correct, estimate, mask=None, window=20):
  """Per image and channel with the reference loops, then the mean (float64)."""
  c, e = np.asarray(correct, np.float64), np.asarray(estimate, np.float64)
  if c.ndim == 3:
    c, e = c[None], e[None]
  m = np.ones(c.shape[:3]) if mask is None else np.asarray(mask, np.float64)
  if m.ndim == c.ndim:  # trailing channel of 1
    m = m[..., 0]
  m = np.broadcast_to(m, c.shape[:3])
  return np.mean([[reference_local_error(c[i, ..., k], e[i, ..., k], m[i], window, window // 2)
                   for k in range(c.shape[-1])] for i in range(c.shape[0])])


def _mask_with_holes(rng, shape, holes=4):
  """[..., H, W] ones with random zero rectangles in each image."""
  mask = np.ones(shape, np.float32)
  for idx in np.ndindex(*shape[:-2]):
    for _ in range(holes):
      h0, w0 = rng.integers(0, shape[-2] - 3), rng.integers(0, shape[-1] - 3)
      mask[idx][h0:h0 + rng.integers(3, 15), w0:w0 + rng.integers(3, 15)] = 0
  return mask


def _estimate(rng, correct):
  """A plausible estimate: a smoothly rescaled truth plus noise, clipped to [0, 1]."""
  h, w = correct.shape[-3:-1]
  gain = 0.6 + 0.8 * np.linspace(0, 1, h)[:, None, None] * np.linspace(1, 0.5, w)[None, :, None]
  noisy = gain * correct + 0.1 * rng.standard_normal(correct.shape)
  return np.clip(noisy, 0, 1).astype(np.float32)


@pytest.mark.parametrize("shape, window, mask_kind", [
    ((37, 53, 1), 20, "holes"),          # single image, sizes not multiples of 10
    ((2, 37, 53, 3), 20, "holes"),       # batch, per-image masks
    ((2, 37, 53, 3), 7, "shared"),       # another window (shift 3), one [H, W] mask
    ((3, 40, 60, 1), 20, None),          # exact multiples, no mask
    ((2, 31, 26, 2), 12, "trailing"),    # mask [N, H, W, 1]
    ((2, 24, 24, 1), 20, "binary_est"),  # windows where the estimate is ~0 (a = 0)
])
def test_lmse_matches_reference_loops(shape, window, mask_kind):
  rng = np.random.default_rng(sum(shape) + window)
  correct = rng.random(shape, np.float32)
  estimate = _estimate(rng, correct)
  batch = shape[:-1] if len(shape) == 4 else shape[:2]
  mask = None
  if mask_kind == "holes":
    mask = _mask_with_holes(rng, batch) > 0  # bool
  elif mask_kind == "shared":
    mask = _mask_with_holes(rng, shape[-3:-1])
  elif mask_kind == "trailing":
    mask = _mask_with_holes(rng, batch)[..., None]
  elif mask_kind == "binary_est":
    estimate[..., :12, :, :] = 0  # the top windows see only zeros (or tiny values)
    estimate[..., 12:14, :5, :] = 1e-4
  got = metrics.lmse(correct, estimate, mask, window=window)
  assert got.shape == () and got.dtype == jnp.float32
  want = reference_lmse(correct, estimate, mask, window)
  assert 0 < want < 1
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # Jitted (window static) gives the same value.
  jitted = jax.jit(metrics.lmse, static_argnames="window")(correct, estimate, mask, window=window)
  np.testing.assert_allclose(float(jitted), float(got), rtol=1e-6)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_lmse_matches_reference_on_random_shapes(data):
  window = data.draw(st.integers(2, 9), label="window")
  shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=window, max_side=17))
  shape = shape + (data.draw(st.integers(1, 2), label="channels"),)
  c = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(0.125, 1, width=32)))
  e = data.draw(hnp.arrays(np.float32, shape, elements=_unit))
  m = data.draw(hnp.arrays(np.bool_, shape[:2]))
  want = reference_lmse(c, e, m, window)
  got = float(metrics.lmse(c, e, m, window=window))
  if np.isfinite(want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  else:  # no valid pixel in any window: 0/0 in both
    assert np.isnan(got)


def test_lmse_properties():
  rng = np.random.default_rng(3)
  c = rng.random((2, 37, 53, 3), np.float32)
  mask = _mask_with_holes(rng, (2, 37, 53))
  assert float(metrics.lmse(c, c, mask)) == pytest.approx(0.0, abs=1e-7)
  for k in (0.25, 1.0, 3.0):  # scale invariance
    assert float(metrics.lmse(c, k * c, mask)) == pytest.approx(0.0, abs=1e-6)
  # estimate 0: a = 0 in every window, error = sum m c^2 = the normaliser.
  zero = np.zeros_like(c)
  assert float(metrics.lmse(c, zero, mask)) == pytest.approx(1.0, rel=1e-6)
  assert reference_lmse(c, zero, mask) == pytest.approx(1.0, rel=1e-12)
  # A 0/255 mask scores like the 0/1 mask (numerator and denominator scale alike).
  e = _estimate(rng, c)
  np.testing.assert_allclose(float(metrics.lmse(c, e, (mask * 255).astype(np.uint8))),
                             float(metrics.lmse(c, e, mask)), rtol=1e-5)
  # Border rows / columns outside every whole window are not scored: 37 x 53 with
  # window 20, shift 10 scores rows 0..29 and columns 0..49.
  e2 = e.copy()
  e2[:, 30:], e2[:, :, 50:] = 0, 1
  assert float(metrics.lmse(c, e2, mask)) == float(metrics.lmse(c, e, mask))
  e2[:, 29, 10] = 0
  assert float(metrics.lmse(c, e2, mask)) != float(metrics.lmse(c, e, mask))
  # Batch = mean of per-image scores; a shared [H, W] mask = that mask per image.
  singles = [float(metrics.lmse(c[i], e[i], mask[i])) for i in range(2)]
  np.testing.assert_allclose(float(metrics.lmse(c, e, mask)), np.mean(singles), rtol=1e-6)
  np.testing.assert_allclose(float(metrics.lmse(c, e, mask[0])),
                             float(metrics.lmse(c, e, np.stack([mask[0]] * 2))), rtol=1e-6)
  # No signal under the mask: the reference's 0/0.
  assert np.isnan(float(metrics.lmse(zero, c)))


def test_mit_lmse_is_half_albedo_half_shading():
  rng = np.random.default_rng(4)
  albedo = rng.random((2, 33, 41, 3), np.float32)
  shading = rng.random((2, 33, 41, 1), np.float32)
  albedo_pred, shading_pred = _estimate(rng, albedo), _estimate(rng, shading)
  mask = _mask_with_holes(rng, (33, 41)) > 0
  gray = lambda x: x.mean(-1, keepdims=True)
  want = (0.5 * reference_lmse(gray(albedo), gray(albedo_pred), mask)
          + 0.5 * reference_lmse(shading, shading_pred, mask))
  got = metrics.mit_lmse(albedo, albedo_pred, shading, shading_pred, mask)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # 3-channel shading is converted to gray as well; single images work.
  shading3, shading3_pred = np.repeat(shading, 3, -1), np.repeat(shading_pred, 3, -1)
  np.testing.assert_allclose(
      float(metrics.mit_lmse(albedo, albedo_pred, shading3, shading3_pred, mask)), want,
      rtol=1e-4)
  single = metrics.mit_lmse(albedo[0], albedo_pred[0], shading[0], shading_pred[0], mask)
  np.testing.assert_allclose(
      float(single), 0.5 * reference_lmse(gray(albedo[:1]), gray(albedo_pred[:1]), mask)
      + 0.5 * reference_lmse(shading[:1], shading_pred[:1], mask), rtol=1e-4)
  with pytest.raises(ValueError, match=r"\(2, 33, 41, 3\).*\(2, 33, 40, 1\)"):
    metrics.mit_lmse(albedo, albedo_pred, shading[:, :, :40], shading_pred[:, :, :40])


# ---------------------------------------------------------------------------
# PSNR / SSIM against scikit-image.


def _images(kind, shape, seed):
  rng = np.random.default_rng(seed)
  if kind == "random":
    a, b = rng.random(shape), rng.random(shape)
  else:  # smooth gradients plus noise: the regime real images are in
    h, w, c = shape[-3:]
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([(0.3 + 0.6 * xx * yy), 0.5 + 0.4 * np.sin(6 * xx), 0.8 * yy][:c], -1)
    a = np.broadcast_to(base, shape) + 0.02 * rng.standard_normal(shape)
    b = a + 0.1 * rng.standard_normal(shape)
  return np.clip(a, 0, 1).astype(np.float32), np.clip(b, 0, 1).astype(np.float32)


@pytest.mark.parametrize("kind, shape", [
    ("random", (24, 29, 3)),
    ("structured", (32, 40, 3)),
    ("random", (3, 16, 21, 1)),
    ("structured", (3, 48, 37, 3)),
])
def test_psnr_ssim_match_skimage(kind, shape):
  skm = pytest.importorskip("skimage.metrics")
  a, b = _images(kind, shape, len(shape) + shape[-2])
  batch_a, batch_b = (a, b) if a.ndim == 4 else (a[None], b[None])
  want_psnr = np.mean([skm.peak_signal_noise_ratio(u, v, data_range=1.0)
                       for u, v in zip(batch_a, batch_b)])
  want_ssim = np.mean([skm.structural_similarity(
      u, v, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=1.0, channel_axis=-1) for u, v in zip(batch_a, batch_b)])
  got_psnr, got_ssim = metrics.psnr(a, b), metrics.ssim(a, b)
  assert got_psnr.shape == got_ssim.shape == () and got_ssim.dtype == jnp.float32
  np.testing.assert_allclose(float(got_psnr), want_psnr, rtol=1e-4)
  np.testing.assert_allclose(float(got_ssim), want_ssim, atol=1e-4)
  np.testing.assert_allclose(float(jax.jit(metrics.ssim)(a, b)), float(got_ssim), atol=1e-6)
  assert float(metrics.ssim(a, a)) == pytest.approx(1.0, abs=1e-5)
  assert float(metrics.psnr(a, a)) == np.inf


def test_per_layer_metrics():
  rng = np.random.default_rng(5)
  true = rng.random((2, 3, 24, 26, 3), np.float32)
  pred = _estimate(rng, true)
  mask = _mask_with_holes(rng, (2, 24, 26))
  names = ("a", "b", "c")
  scores = metrics.per_layer_metrics(pred, true, names, mask=mask)
  assert list(scores) == list(names)
  for k, name in enumerate(names):
    assert list(scores[name]) == ["mse", "lmse", "psnr", "ssim"]
    assert all(type(v) is float for v in scores[name].values())
    np.testing.assert_allclose(scores[name]["mse"], reference_mse(pred[:, k], true[:, k]),
                               rtol=1e-5)
    np.testing.assert_allclose(scores[name]["lmse"],
                               reference_lmse(true[:, k], pred[:, k], mask), rtol=1e-4)
    np.testing.assert_allclose(scores[name]["psnr"], float(metrics.psnr(pred[:, k], true[:, k])),
                               rtol=1e-6)
    np.testing.assert_allclose(scores[name]["ssim"], float(metrics.ssim(pred[:, k], true[:, k])),
                               rtol=1e-6)
  only = metrics.per_layer_metrics(pred, true, names, which=("psnr",))
  assert only == {name: {"psnr": scores[name]["psnr"]} for name in names}
  with pytest.raises(ValueError, match="unknown metrics.*'ssmi'.*available"):
    metrics.per_layer_metrics(pred, true, names, which=("ssmi",))
  with pytest.raises(ValueError, match="N=3.*2 names"):
    metrics.per_layer_metrics(pred, true, names[:2])
  with pytest.raises(ValueError, match=r"mask.*\(24, 26\).*got shape \(3, 24, 26\)"):
    metrics.per_layer_metrics(pred, true, names, mask=np.ones((3, 24, 26)))
  with pytest.raises(ValueError, match="pred_layers.*uint8"):
    metrics.per_layer_metrics(pred.astype(np.uint8), true, names)


# ---------------------------------------------------------------------------
# Errors a user can cause.

_PAIR_FUNCTIONS = {
    "mse": metrics.mse,
    "lmse": metrics.lmse,
    "psnr": metrics.psnr,
    "ssim": metrics.ssim,
}


@pytest.mark.parametrize("fn", list(_PAIR_FUNCTIONS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_integer_images_are_rejected(fn, dtype):
  first, second = ("correct", "estimate") if fn == "lmse" else ("a", "b")
  ints = np.zeros((24, 24, 3), dtype)
  floats = np.zeros((24, 24, 3), np.float32)
  with pytest.raises(ValueError, match=rf"^{fn}: {first} must be a float image with values "
                     rf"in \[0, 1\], got dtype {np.dtype(dtype)} .*convert it first"):
    _PAIR_FUNCTIONS[fn](ints, floats)
  with pytest.raises(ValueError, match=rf"^{fn}: {second} must be a float image"):
    _PAIR_FUNCTIONS[fn](floats, ints)


@pytest.mark.parametrize("fn", ["lmse", "psnr", "ssim"])
@pytest.mark.parametrize("shape_a, shape_b", [
    ((24, 24, 3), (24, 24, 1)),
    ((2, 24, 24, 3), (24, 24, 3)),
    ((24, 24), (24, 24)),
    ((1, 2, 24, 24, 3), (1, 2, 24, 24, 3)),
])
def test_shape_errors_name_the_shapes(fn, shape_a, shape_b):
  with pytest.raises(ValueError, match=rf"^{fn} expects") as err:
    _PAIR_FUNCTIONS[fn](np.zeros(shape_a, np.float32), np.zeros(shape_b, np.float32))
  assert str(shape_a) in str(err.value) and str(shape_b) in str(err.value)


def test_lmse_mask_window_and_size_errors():
  c = np.ones((2, 30, 40, 3), np.float32)
  for bad in [(30, 41), (3, 30, 40), (2, 30, 40, 3), (40, 30)]:
    with pytest.raises(ValueError, match=rf"lmse: mask.*\(30, 40\).*got shape {re.escape(str(bad))}"):
      metrics.lmse(c, c, np.ones(bad))
  with pytest.raises(ValueError, match=r"lmse: mask.*got shape \(2, 30, 40\)"):
    metrics.lmse(c[0], c[0], np.ones((2, 30, 40)))  # batch mask for one image
  with pytest.raises(ValueError, match=r"smaller than one 32x32 window"):
    metrics.lmse(c, c, window=32)
  with pytest.raises(ValueError, match="window must be an int >= 2"):
    metrics.lmse(c, c, window=1)
  with pytest.raises(ValueError, match=r"ssim: .*\(1, 10, 40, 3\).*11x11"):
    metrics.ssim(c[0, :10], c[0, :10])


def test_mse_rejects_integer_images_but_keeps_float_behaviour():
  a = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match=r"mse: a must be a float image.*uint8"):
    metrics.mse(a, a.astype(np.float32))
  # float16 / float64 inputs are still accepted (computed in float32).
  half = metrics.mse(np.full((4, 4, 3), 0.5, np.float16), np.zeros((4, 4, 3)))
  assert half.dtype == jnp.float32 and float(half) == 0.25
  with pytest.raises(ValueError, match="trivial_baselines: x must be a float image"):
    metrics.trivial_baselines(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2, 8, 8, 3)),
                              ("a", "b"))


# ---------------------------------------------------------------------------
# Diagnostics: order-invariant MSE and leakage.


def _shape_layers(rng, b, n, s=8):
  """[b, n, s, s, 3] layers, each one constant-valued block somewhere, and their sum."""
  layers = np.zeros((b, n, s, s, 3), np.float32)
  for i in range(b):
    for k in range(n):
      r, c = rng.integers(0, s - 3, 2)
      layers[i, k, r:r + 3, c:c + 3] = rng.uniform(0.1, 0.5)
  return layers, layers.sum(1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.sampled_from([2, 3]))
def test_order_invariant_mse_ignores_the_layer_order(seed, n):
  rng = np.random.default_rng(seed)
  true, _ = _shape_layers(rng, 3, n)
  pred = np.clip(true + rng.normal(0, 0.05, true.shape), 0, 1).astype(np.float32)
  got = float(metrics.order_invariant_mse(pred, true))
  assert got <= float(np.mean([metrics.mse(pred[:, k], true[:, k]) for k in range(n)])) + 1e-7
  perm = rng.permutation(n)
  assert float(metrics.order_invariant_mse(pred[:, perm], true)) == pytest.approx(got, rel=1e-5)
  assert float(metrics.order_invariant_mse(true[:, perm], true)) == 0.0
  # a reference: the best permutation per image, by brute force in numpy
  import itertools
  ref = np.mean([min(np.mean([np.mean((pred[i, p[k]] - true[i, k]) ** 2) for k in range(n)])
                     for p in itertools.permutations(range(n))) for i in range(len(true))])
  assert got == pytest.approx(ref, rel=1e-5)


def test_leakage_is_zero_for_a_clean_split_a_quarter_for_x_over_2_one_for_copies():
  rng = np.random.default_rng(0)
  true, x = _shape_layers(rng, 6, 2)
  np.testing.assert_allclose(metrics.leakage(true, true, x), 0.0, atol=0)
  np.testing.assert_allclose(metrics.leakage(np.stack([x / 2] * 2, 1), true, x), 0.25, rtol=1e-6)
  np.testing.assert_allclose(metrics.leakage(np.stack([x] * 2, 1), true, x), 1.0, rtol=1e-6)
  # leaking only into layer 0: its score moves, layer 1's does not
  leaky = true.copy()
  leaky[:, 0] += true[:, 1]
  got = np.asarray(metrics.leakage(leaky, true, x))
  assert got[0] > 0.5 and got[1] == 0.0
  # layer 0 covers every pixel, so no pixel belongs to the other layer only: NaN for
  # layer 0, not a made-up number
  covered = true.copy()
  covered[:, 0] = 0.3
  got = np.asarray(metrics.leakage(covered, covered, covered.sum(1)))
  assert np.isnan(got[0]) and got[1] == 0.0
