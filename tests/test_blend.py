"""Property tests of sils_jax.blend (eq. (1) of the paper)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sils_jax import blend

EPS = float(np.float32(1e-4))  # exactly representable, as hypothesis needs
SHAPE = (2, 3, 3)  # one fixed shape: jax compiles once per shape
SETTINGS = settings(max_examples=50, deadline=None)


def layer_arrays(n, lo, hi):
  """n float32 arrays of SHAPE with values in [lo, hi]."""
  elements = st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)
  return st.lists(hnp.arrays(np.float32, SHAPE, elements=elements),
                  min_size=n, max_size=n)


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_additive_complement_then_compose_recovers_x(n, data):
  x = data.draw(hnp.arrays(np.float32, SHAPE, elements=st.floats(-100, 100, width=32)))
  known = data.draw(layer_arrays(n - 1, -100, 100))
  missing = blend.complement(x, known, "additive")
  rec = blend.compose(known + [missing], "additive")
  np.testing.assert_allclose(rec, x, rtol=0, atol=1e-4 * n)


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_multiplicative_complement_then_compose_recovers_x(n, data):
  # Known layers in [eps, 1] (images) and x >= eps keep the complement >= eps.
  x = data.draw(hnp.arrays(np.float32, SHAPE, elements=st.floats(EPS, 10, width=32)))
  known = data.draw(layer_arrays(n - 1, EPS, 1.0))
  missing = blend.complement(x, known, "multiplicative", eps=EPS)
  assert np.all(np.asarray(missing) >= EPS)
  rec = blend.compose(known + [missing], "multiplicative", eps=EPS)
  np.testing.assert_allclose(rec, x, rtol=1e-5)


@SETTINGS
@given(n=st.sampled_from([2, 3]), mode=st.sampled_from(blend.MODES), data=st.data())
def test_compose_then_complement_recovers_last_layer(n, mode, data):
  layers = data.draw(layer_arrays(n, EPS, 1.0))
  x = blend.compose(layers, mode)
  np.testing.assert_allclose(blend.complement(x, layers[:-1], mode), layers[-1],
                             rtol=1e-5, atol=1e-5)


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_multiplicative_equals_product_above_eps(n, data):
  layers = data.draw(layer_arrays(n, EPS, 100.0))
  expected = functools.reduce(np.multiply, [l.astype(np.float64) for l in layers])
  np.testing.assert_allclose(blend.compose(layers, "multiplicative"), expected,
                             rtol=1e-5)
  # exp(sum(log(max(L, eps)))) is the same function.
  log_domain = np.exp(sum(np.log(np.maximum(l.astype(np.float64), EPS))
                         for l in layers))
  np.testing.assert_allclose(blend.compose(layers, "multiplicative"), log_domain,
                             rtol=1e-5)


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_additive_equals_sum(n, data):
  layers = data.draw(layer_arrays(n, -10, 10))
  np.testing.assert_allclose(blend.compose(layers, "additive"),
                             np.sum(np.stack(layers).astype(np.float64), axis=0),
                             atol=1e-5)


@pytest.mark.parametrize("mode", blend.MODES)
def test_stacked_array_equals_sequence(mode):
  layers = np.random.default_rng(0).uniform(0, 1, (3,) + SHAPE).astype(np.float32)
  np.testing.assert_allclose(blend.compose(layers, mode),
                             blend.compose(list(layers), mode), rtol=1e-6)
  x = blend.compose(layers, mode)
  np.testing.assert_allclose(blend.complement(x, layers[:2], mode),
                             blend.complement(x, list(layers[:2]), mode), rtol=1e-6)


def test_multiplicative_clamps_zeros_and_negatives():
  layers = [np.array([0.0, -1.0, 0.5]), np.array([2.0, 3.0, 0.0])]
  out = np.asarray(blend.compose(layers, "multiplicative", eps=EPS))
  np.testing.assert_allclose(out, [EPS * 2.0, EPS * 3.0, 0.5 * EPS], rtol=1e-6)


def test_output_is_float32():
  layers = [np.ones(SHAPE, np.float64), np.ones(SHAPE, np.int32)]
  for mode in blend.MODES:
    assert blend.compose(layers, mode).dtype == jnp.float32
    assert blend.complement(np.ones(SHAPE), layers[:1], mode).dtype == jnp.float32


@pytest.mark.parametrize("mode", blend.MODES)
@pytest.mark.parametrize("value", [0.0, 1e6, -1e6])
def test_gradients_finite_at_extremes(mode, value):
  base = jnp.full((3,) + SHAPE, value, jnp.float32)
  mixed = base.at[1].set(0.0).at[2, 0].set(-1e6)
  for layers in (base, mixed, jnp.zeros((2,) + SHAPE)):
    out = blend.compose(layers, mode)
    grad = jax.grad(lambda l: jnp.sum(blend.compose(l, mode)))(layers)
    # Three clamped layers of 1e6 multiply to 1e18: finite in float32.
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
    x = jnp.full(SHAPE, value)
    out = blend.complement(x, layers[:-1], mode)
    gx, gk = jax.grad(lambda x, k: jnp.sum(blend.complement(x, k, mode)),
                      argnums=(0, 1))(x, layers[:-1])
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gk))


@pytest.mark.parametrize("mode", blend.MODES)
def test_jittable(mode):
  layers = np.random.default_rng(1).uniform(0, 1, (2,) + SHAPE)
  layers = jnp.asarray(layers, jnp.float32)
  jitted = jax.jit(blend.compose, static_argnames="mode")
  np.testing.assert_allclose(jitted(layers, mode=mode), blend.compose(layers, mode),
                             rtol=1e-6)
  x = blend.compose(layers, mode)
  jitted_c = jax.jit(blend.complement, static_argnames="mode")
  np.testing.assert_allclose(jitted_c(x, [layers[0]], mode=mode), layers[1],
                             rtol=1e-5, atol=1e-6)


def test_bad_mode_raises():
  layers = [np.ones(SHAPE), np.ones(SHAPE)]
  for fn in (lambda: blend.compose(layers, "screen"),
             lambda: blend.complement(layers[0], layers[:1], "screen")):
    with pytest.raises(ValueError, match=r"mode.*additive.*multiplicative"):
      fn()


def test_bad_layers_raise():
  with pytest.raises(ValueError, match="layers"):
    blend.compose([np.ones((2, 2)), np.ones((3, 3))], "additive")
  with pytest.raises(ValueError, match="layers"):
    blend.compose([], "additive")
  with pytest.raises(ValueError, match="known_layers"):
    blend.complement(np.ones((2, 2)), [np.ones((3, 3))], "additive")
  with pytest.raises(ValueError, match="eps"):
    blend.compose([np.ones((2, 2))], "multiplicative", eps=0.0)


def test_complement_of_no_known_layers_is_x():
  x = np.arange(6.0).reshape(2, 3)
  for mode in blend.MODES:
    np.testing.assert_allclose(blend.complement(x, [], mode), x)
