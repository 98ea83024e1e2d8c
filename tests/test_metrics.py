"""Tests for sils_jax.metrics."""

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
