"""Property tests of sils_jax.losses (eqs. (5)-(9) of the paper)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sils_jax import losses

# Modest example counts and no deadline (jax compiles on first use): the file runs
# in well under 30 s on 2 CPU cores.
SETTINGS = settings(max_examples=25, deadline=None)
SHAPE = (2, 3, 2)  # one small fixed shape: jax compiles once per shape
ALPHAS = (1.0, 1.4, 2.0)  # the curves of Fig. 3b (top) around the paper's 1.4
EXTREMES = (0.0, 1e6, -1e6)


def arrays(lo=-5.0, hi=5.0, shape=SHAPE):
  # No subnormals: XLA:CPU flushes them to zero, numpy references do not.
  return hnp.arrays(np.float32, shape,
                    elements=st.floats(lo, hi, width=32, allow_subnormal=False))


def extreme_arrays(shape=SHAPE):
  """Arrays of 0, +-1e6, mixed with a few ordinary values."""
  return hnp.arrays(np.float32, shape,
                    elements=st.sampled_from(EXTREMES + (1.0, -0.25, 3.0)))


def grid_arrays(shape=SHAPE):
  """Multiples of 1/1024 in [-100, 100]: differences are exact and never flushed."""
  return hnp.arrays(np.float32, shape,
                    elements=st.integers(-102400, 102400).map(lambda i: i / 1024))


def d_psi_reference(a, b, alpha):
  """Eq. (6) transcribed literally, float64: d_psi = 1 / (1 + e^g)."""
  a, b = np.float64(a), np.float64(b)
  g = -(np.abs(a - b) - alpha * np.exp(alpha)) / alpha**2
  return 1.0 / (1.0 + np.exp(g))


@jax.jit
def _one_minus_d_psi(dist, alpha):
  zero = jnp.zeros((1,))

  def loss(d):
    codes = [d[None], zero]
    return losses.ss_loss(codes, codes, lambda_intra=[0.0, 0.0], lambda_inter=1.0,
                          alpha=alpha)["ss_inter"]

  return jax.vmap(loss)(dist)


def one_minus_d_psi(dist, alpha):
  """The loss of Fig. 3b (top), 1 - d_psi at distance |a - b| = dist, as ss_loss's
  inter term computes it (which keeps precision where d_psi is near 1)."""
  dist = np.atleast_1d(np.asarray(dist, np.float32))
  return np.asarray(_one_minus_d_psi(dist, np.float32(alpha)), np.float64)


def all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------- d_psi


@SETTINGS
@given(a=arrays(), b=arrays(), alpha=st.sampled_from(ALPHAS))
def test_d_psi_strictly_inside_unit_interval_and_symmetric(a, b, alpha):
  d = np.asarray(losses.ss_distance(a, b, alpha))
  assert d.dtype == np.float32 and d.shape == SHAPE
  assert np.all(d > 0) and np.all(d < 1)
  np.testing.assert_array_equal(d, losses.ss_distance(b, a, alpha))


@SETTINGS
@given(a=extreme_arrays(), b=extreme_arrays(),
       alpha=st.sampled_from((0.5,) + ALPHAS + (3.0,)))
def test_d_psi_in_closed_unit_interval_for_extreme_inputs(a, b, alpha):
  d = np.asarray(losses.ss_distance(a, b, alpha))
  assert np.all(np.isfinite(d)) and np.all(d >= 0) and np.all(d <= 1)
  np.testing.assert_array_equal(d, losses.ss_distance(b, a, alpha))


@SETTINGS
@given(a=arrays(), b=arrays(), alpha=st.sampled_from((0.5,) + ALPHAS + (3.0,)))
def test_d_psi_matches_float64_transcription_of_eq6(a, b, alpha):
  np.testing.assert_allclose(losses.ss_distance(a, b, alpha),
                             d_psi_reference(a, b, alpha), rtol=1e-5, atol=1e-7)


@SETTINGS
@given(dist=hnp.arrays(np.float32, (16,), elements=st.floats(0, 1e4, width=32)),
       alpha=st.sampled_from((0.5,) + ALPHAS + (3.0,)))
def test_d_psi_non_decreasing_in_distance(dist, alpha):
  dist = np.sort(dist)
  d = np.asarray(losses.ss_distance(dist, 0.0, alpha))
  assert np.all(np.diff(d) >= 0)
  # Only |a - b| matters: the sign and offset of the pair do not.
  np.testing.assert_allclose(d, losses.ss_distance(7.0 - dist, 7.0, alpha), atol=1e-6)


@SETTINGS
@given(d1=st.floats(0, 10, width=32), gap=st.floats(2**-6, 10, width=32),
       alpha=st.sampled_from(ALPHAS))
def test_d_psi_strictly_increasing_for_moderate_distance(d1, gap, alpha):
  lo, hi = losses.ss_distance(np.float32([d1, d1 + gap]), 0.0, alpha)
  assert hi > lo


@pytest.mark.parametrize("alpha", (0.5,) + ALPHAS + (3.0,))
def test_d_psi_is_one_half_at_alpha_e_alpha(alpha):
  midpoint = alpha * np.exp(alpha)
  np.testing.assert_allclose(losses.ss_distance(midpoint, 0.0, alpha), 0.5, atol=1e-6)
  np.testing.assert_allclose(losses.ss_distance(-1.0, midpoint - 1.0, alpha), 0.5,
                             atol=1e-6)


def test_one_minus_d_psi_follows_fig3b_curves():
  """Fig. 3b top: loss = 1 - d_psi declines from near 1 to 0; larger alpha -> right."""
  dist = np.linspace(0.0, 60.0, 601)
  curves = {alpha: one_minus_d_psi(dist, alpha) for alpha in ALPHAS}
  for alpha, loss in curves.items():
    assert 0.9 < loss[0] < 1.0  # near 1 at distance 0 ("ranging from 0 to 1")
    assert np.all(np.diff(loss) < 0)  # declines with increasing distance
    assert loss[-1] < 1e-4  # towards 0
    assert one_minus_d_psi(1e3, alpha) < 1e-30
    np.testing.assert_allclose(one_minus_d_psi(alpha * np.exp(alpha), alpha), 0.5,
                               atol=1e-6)
    np.testing.assert_allclose(loss, 1.0 - d_psi_reference(dist, 0.0, alpha),
                               rtol=1e-5, atol=1e-12)
    d_psi = np.asarray(losses.ss_distance(dist, 0.0, alpha))
    np.testing.assert_allclose(loss, 1.0 - d_psi, atol=1e-6)
  # Larger alpha shifts the curve right: at every distance the loss is larger
  # (true for alpha >= 1 and d >= 0: d/dalpha of the logit (alpha e^alpha - d) / alpha^2
  # is (alpha (alpha - 1) e^alpha + 2 d) / alpha^3).
  for small, large in itertools.pairwise(ALPHAS):
    assert np.all(curves[large] > curves[small])


# ----------------------------------------------------------------------- d_phi


@SETTINGS
@given(a=grid_arrays(), b=grid_arrays())
def test_l1_distance_zero_iff_equal(a, b):
  assert losses.l1_distance(a, a) == 0
  d = losses.l1_distance(a, b)
  assert d.shape == () and d.dtype == jnp.float32
  assert (d == 0) == np.array_equal(a, b)
  assert d >= 0
  np.testing.assert_allclose(d, np.mean(np.abs(a.astype(np.float64) - b)),
                             rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------- ss_loss


def ss_eq5_reference(ey_y, ey_x, ez_z, ez_x, lam1, lam2, lam3, alpha):
  """Eq. (5) written out by hand, float64, the paper's elementwise reading."""
  f64 = lambda v: np.asarray(v, np.float64)
  d_phi = lambda a, b: np.mean(np.abs(f64(a) - f64(b)))
  return (lam1 * d_phi(ey_y, ey_x) + lam2 * d_phi(ez_z, ez_x)
          + lam3 * np.mean(1.0 - d_psi_reference(f64(ey_x), f64(ez_x), alpha)))


@SETTINGS
@given(codes=st.lists(arrays(), min_size=4, max_size=4),
       lams=st.tuples(*[st.floats(0, 2)] * 3), alpha=st.sampled_from(ALPHAS))
def test_ss_loss_n2_elementwise_equals_eq5(codes, lams, alpha):
  ey_x, ez_x, ey_y, ez_z = codes
  lam1, lam2, lam3 = lams
  out = losses.ss_loss([ey_x, ez_x], [ey_y, ez_z], lambda_intra=[lam1, lam2],
                       lambda_inter=lam3, alpha=alpha)
  assert set(out) == {"ss_intra_0", "ss_intra_1", "ss_inter", "ss"}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in out.values())
  np.testing.assert_allclose(
      out["ss"], ss_eq5_reference(ey_y, ey_x, ez_z, ez_x, lam1, lam2, lam3, alpha),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      out["ss"], out["ss_intra_0"] + out["ss_intra_1"] + out["ss_inter"],
      rtol=1e-6, atol=1e-7)


@SETTINGS
@given(codes=st.lists(arrays(), min_size=4, max_size=4), alpha=st.sampled_from(ALPHAS),
       scale=st.sampled_from([1.0, 10.0]))
def test_ss_loss_n2_mean_mode_equals_usis_reading(codes, alpha, scale):
  ey_x, ez_x, ey_y, ez_z = codes
  out = losses.ss_loss([ey_x, ez_x], [ey_y, ez_z], lambda_intra=[0.5, 0.5],
                       lambda_inter=1.0, alpha=alpha, mode="mean", scale=scale)
  dist = scale * np.mean(np.abs(ey_x.astype(np.float64) - ez_x))
  np.testing.assert_allclose(out["ss_inter"], 1.0 - d_psi_reference(dist, 0.0, alpha),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["ss_intra_0"],
                             0.5 * np.mean(np.abs(ey_y.astype(np.float64) - ey_x)),
                             rtol=1e-5, atol=1e-7)


@SETTINGS
@given(n=st.sampled_from([2, 3]), mode=st.sampled_from(losses.SS_MODES), data=st.data())
def test_ss_loss_n_layers_is_mean_over_pairs(n, mode, data):
  codes_x = data.draw(st.lists(arrays(), min_size=n, max_size=n))
  codes_y = data.draw(st.lists(arrays(), min_size=n, max_size=n))
  lam = [0.5 + k for k in range(n)]
  out = losses.ss_loss(codes_x, codes_y, lambda_intra=lam, lambda_inter=2.0, mode=mode)
  assert set(out) == {f"ss_intra_{k}" for k in range(n)} | {"ss_inter", "ss"}
  pairs = [
      losses.ss_loss([codes_x[k], codes_x[l]], [codes_y[k], codes_y[l]],
                     lambda_intra=[lam[k], lam[l]], lambda_inter=2.0, mode=mode)
      for k, l in itertools.combinations(range(n), 2)
  ]
  np.testing.assert_allclose(out["ss_inter"], np.mean([p["ss_inter"] for p in pairs]),
                             rtol=1e-5, atol=1e-7)
  for k in range(n):
    np.testing.assert_allclose(out[f"ss_intra_{k}"],
                               lam[k] * losses.l1_distance(codes_y[k], codes_x[k]),
                               rtol=1e-6, atol=1e-7)
  total = sum(out[f"ss_intra_{k}"] for k in range(n)) + out["ss_inter"]
  np.testing.assert_allclose(out["ss"], total, rtol=1e-6, atol=1e-7)


LEVEL_SHAPES = [(2, 2, 2, 3), (2, 1, 1, 5)]


def multilevel_codes(n):
  code = st.tuples(*[hnp.arrays(np.float32, s, elements=st.floats(-5, 5, width=32))
                     for s in LEVEL_SHAPES])
  return st.lists(code.map(list), min_size=n, max_size=n)


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([2, 3]), mode=st.sampled_from(losses.SS_MODES), data=st.data())
def test_ss_loss_multilevel_averages_levels(n, mode, data):
  codes_x = data.draw(multilevel_codes(n))
  codes_y = data.draw(multilevel_codes(n))
  kwargs = dict(lambda_intra=[0.5] * n, lambda_inter=1.0, mode=mode)
  out = losses.ss_loss(codes_x, codes_y, **kwargs)
  per_level = [
      losses.ss_loss([c[j] for c in codes_x], [c[j] for c in codes_y], **kwargs)
      for j in range(len(LEVEL_SHAPES))
  ]
  for key in out:
    np.testing.assert_allclose(out[key], np.mean([p[key] for p in per_level]),
                               rtol=1e-5, err_msg=key)
  # Tuples and lists of levels read the same.
  out_t = losses.ss_loss([tuple(c) for c in codes_x], codes_y, **kwargs)
  np.testing.assert_allclose(out_t["ss"], out["ss"], rtol=1e-6, atol=1e-7)


@SETTINGS
@given(n=st.sampled_from([2, 3]), mode=st.sampled_from(losses.SS_MODES),
       multilevel=st.booleans(), data=st.data())
def test_ss_intra_zero_when_codes_equal(n, mode, multilevel, data):
  codes = data.draw(multilevel_codes(n) if multilevel else
                    st.lists(arrays(), min_size=n, max_size=n))
  out = losses.ss_loss(codes, codes, lambda_intra=[0.5] * n, lambda_inter=1.0,
                       mode=mode)
  for k in range(n):
    assert out[f"ss_intra_{k}"] == 0
  assert 0 < out["ss_inter"] < 1  # 1 - d_psi lies in (0, 1) for moderate codes


@pytest.mark.parametrize("mode", losses.SS_MODES)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_ss_inter_decreases_as_codes_move_apart(mode, n, alpha):
  base = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
  values = []
  for t in np.linspace(0.0, 3.0, 31):
    codes = [base + k * t for k in range(n)]
    out = losses.ss_loss(codes, codes, lambda_intra=[0.5] * n, lambda_inter=1.0,
                         alpha=alpha, mode=mode)
    values.append(float(out["ss_inter"]))
  values = np.array(values)
  assert np.all(np.diff(values) < 0)
  # Identical codes give the maximum, 1 - d_psi(0) = sigmoid(e^alpha / alpha).
  np.testing.assert_allclose(values[0], 1.0 / (1.0 + np.exp(-np.exp(alpha) / alpha)),
                             rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- GAN


@SETTINGS
@given(real=arrays(-20, 20), fake=arrays(-20, 20))
def test_nsgan_d_equals_cross_entropy(real, fake):
  out = losses.nsgan_d_loss(real, fake)
  r, f = real.astype(np.float64), fake.astype(np.float64)
  sig = lambda v: 1.0 / (1.0 + np.exp(-v))
  expected = np.mean(-np.log(sig(r))) + np.mean(-np.log(1.0 - sig(f)))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  bce = (optax.sigmoid_binary_cross_entropy(real, jnp.ones_like(real)).mean()
         + optax.sigmoid_binary_cross_entropy(fake, jnp.zeros_like(fake)).mean())
  np.testing.assert_allclose(out, bce, rtol=1e-5, atol=1e-6)
  assert out > 0
  assert losses.gan_d_loss("nsgan", real, fake) == out


_NSGAN_D_GRAD = jax.jit(jax.grad(losses.nsgan_d_loss, argnums=(0, 1)))


@SETTINGS
@given(real=arrays(-20, 20), fake=arrays(-20, 20), step=st.floats(0.5, 10))
def test_nsgan_d_minimised_by_confident_discriminator(real, fake, step):
  loss = losses.nsgan_d_loss(real, fake)
  assert losses.nsgan_d_loss(real + step, fake) <= loss
  assert losses.nsgan_d_loss(real, fake - step) <= loss
  # Strictly: raising any real logit or lowering any fake logit lowers the loss
  # (checked on the gradient, which float32 resolves where the sum would not).
  g_real, g_fake = _NSGAN_D_GRAD(real, fake)
  assert np.all(g_real < 0) and np.all(g_fake > 0)
  assert losses.nsgan_d_loss(np.full(SHAPE, 1e6), np.full(SHAPE, -1e6)) == 0
  assert losses.nsgan_d_loss(np.full(SHAPE, 1e6), np.full(SHAPE, 1e6)) > 1e5


@SETTINGS
@given(fake=arrays(-20, 20), step=st.floats(0.5, 10))
def test_nsgan_g_non_negative_and_non_saturating(fake, step):
  out = losses.nsgan_g_loss(fake)
  assert out >= 0
  np.testing.assert_allclose(out, np.mean(np.logaddexp(0.0, -fake.astype(np.float64))),
                             rtol=1e-5, atol=1e-7)
  assert losses.nsgan_g_loss(fake + step) < out
  assert losses.gan_g_loss("nsgan", fake) == out


def test_nsgan_g_gradient_does_not_saturate():
  # A confidently rejected fake still gets a gradient of ~1 per element (mean),
  # where the paper's log(1 - D(G)) would give ~0.
  grad = jax.grad(losses.nsgan_g_loss)(jnp.full(SHAPE, -30.0))
  np.testing.assert_allclose(grad, -1.0 / np.prod(SHAPE), rtol=1e-5, atol=1e-7)
  saturating = jax.grad(lambda f: jnp.mean(jnp.log1p(-jax.nn.sigmoid(f))))
  assert np.all(np.abs(saturating(jnp.full(SHAPE, -30.0))) < 1e-12)


@SETTINGS
@given(real=arrays(-20, 20), fake=arrays(-20, 20))
def test_lsgan_zero_at_targets_and_non_negative(real, fake):
  ones, zeros = np.ones(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
  assert losses.lsgan_d_loss(ones, zeros) == 0
  assert losses.lsgan_g_loss(ones) == 0
  d, g = losses.lsgan_d_loss(real, fake), losses.lsgan_g_loss(fake)
  assert d >= 0 and g >= 0
  r, f = real.astype(np.float64), fake.astype(np.float64)
  np.testing.assert_allclose(d, np.mean((r - 1) ** 2) + np.mean(f**2),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g, np.mean((f - 1) ** 2), rtol=1e-5, atol=1e-7)
  assert losses.gan_d_loss("lsgan", real, fake) == d
  assert losses.gan_g_loss("lsgan", fake) == g


@SETTINGS
@given(kind=st.sampled_from(losses.GAN_KINDS),
       real=st.lists(arrays(-20, 20), min_size=3, max_size=3),
       fake=st.lists(arrays(-20, 20), min_size=3, max_size=3))
def test_gan_losses_sum_over_branches(kind, real, fake):
  # Branches of different resolutions, as a multi-scale discriminator gives.
  real = [r[:, : 3 - j] for j, r in enumerate(real)]
  fake = [f[:, : 3 - j] for j, f in enumerate(fake)]
  np.testing.assert_allclose(
      losses.gan_d_loss(kind, real, fake),
      sum(losses.gan_d_loss(kind, r, f) for r, f in zip(real, fake)),
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses.gan_g_loss(kind, tuple(fake)),
                             sum(losses.gan_g_loss(kind, f) for f in fake),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- R1


@SETTINGS
@given(grad=arrays(-5, 5), c=st.floats(0, 10))
def test_r1_penalty(grad, c):
  assert losses.r1_penalty(np.zeros(SHAPE)) == 0
  out = losses.r1_penalty(grad)
  assert out >= 0 and out.shape == ()
  g = grad.astype(np.float64)
  expected = 0.5 * np.mean(np.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.r1_penalty(c * grad), c**2 * expected,
                             rtol=1e-4, atol=1e-6)


def test_r1_penalty_of_a_discriminator_gradient():
  """R1 on a linear D(y) = <w, y>: the gradient is w for every sample."""
  w = jnp.arange(12.0).reshape(3, 4) / 10
  real = jnp.ones((5, 3, 4))
  grad = jax.grad(lambda y: jnp.sum(y * w))(real)
  np.testing.assert_allclose(losses.r1_penalty(grad), 0.5 * np.sum(np.square(w)),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- CC


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_cycle_losses(n, data):
  x, x_rec = data.draw(arrays()), data.draw(arrays())
  preds = data.draw(st.lists(arrays(), min_size=n, max_size=n))
  cycles = data.draw(st.lists(arrays(), min_size=n, max_size=n))
  lam = [1.0 + k for k in range(n)]
  zero = losses.cycle_losses(x, preds, x, preds, lambda_x=10.0, lambda_layers=lam)
  assert set(zero) == {"cc_x", "cc"} | {f"cc_{k}" for k in range(n)}
  assert all(v == 0 for v in zero.values())
  out = losses.cycle_losses(x, preds, x_rec, cycles, lambda_x=10.0, lambda_layers=lam)
  assert all(v >= 0 for v in out.values())
  f64 = lambda v: np.asarray(v, np.float64)
  np.testing.assert_allclose(out["cc_x"], 10.0 * np.mean(np.abs(f64(x_rec) - x)),
                             rtol=1e-5, atol=1e-6)
  for k in range(n):
    np.testing.assert_allclose(out[f"cc_{k}"],
                               lam[k] * np.mean(np.abs(f64(cycles[k]) - preds[k])),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      out["cc"], out["cc_x"] + sum(out[f"cc_{k}"] for k in range(n)),
      rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------- totals


def test_objectives():
  g = losses.generator_objective(2.0, 3.0, 4.0, lambda0=5.0, w1=1.0, w2=10.0)
  assert g == 1.0 * 2.0 + 5.0 * 3.0 + 10.0 * 4.0 and g.dtype == jnp.float32
  assert losses.generator_objective(2.0, 3.0, 4.0, lambda0=5.0) == 2.0 + 15.0 + 4.0
  d = losses.discriminator_objective(3.0, lambda0=5.0, gp=2.0, gp_weight=10.0)
  assert d == 5.0 * 3.0 + 10.0 * 2.0 and d.dtype == jnp.float32
  assert losses.discriminator_objective(3.0, lambda0=5.0) == 15.0


# ---------------------------------------------- extreme inputs: values and grads


def _ss(mode, n, codes_x, codes_y):
  out = losses.ss_loss(codes_x, codes_y, lambda_intra=[0.5] * n, lambda_inter=1.0,
                       mode=mode)
  return out["ss"], out


def _value_and_grads(fn, argnums):
  return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))


# N = 3 codes of two levels exercise every path (levels, pairs) of ss_loss.
_SS_VG = {mode: _value_and_grads(functools.partial(_ss, mode, 3), (0, 1))
          for mode in losses.SS_MODES}


def _gan(kind, real, fake):
  d = losses.gan_d_loss(kind, real, fake)
  g = losses.gan_g_loss(kind, fake)
  return d + g, (d, g)


_GAN_VG = {kind: _value_and_grads(functools.partial(_gan, kind), (0, 1))
           for kind in losses.GAN_KINDS}


def _rest(a, b, x, preds, x_rec, cycles):
  dpsi = losses.ss_distance(a, b)
  l1 = losses.l1_distance(a, b)
  r1 = losses.r1_penalty(a)
  cc = losses.cycle_losses(x, preds, x_rec, cycles, lambda_x=10.0,
                           lambda_layers=[10.0] * len(preds))
  total = jnp.sum(dpsi) + l1 + r1 + cc["cc"]
  gen = losses.generator_objective(l1, r1, cc["cc"], lambda0=5.0, w2=10.0)
  dis = losses.discriminator_objective(l1, lambda0=5.0, gp=r1, gp_weight=10.0)
  return total + gen + dis, (dpsi, l1, r1, cc, gen, dis)


_REST_VG = _value_and_grads(_rest, tuple(range(6)))


@SETTINGS
@given(data=st.data())
def test_ss_loss_and_gradient_finite_for_extreme_inputs(data):
  code = st.tuples(extreme_arrays(SHAPE), extreme_arrays((2, 2))).map(list)
  codes_x = data.draw(st.lists(code, min_size=3, max_size=3))
  codes_y = data.draw(st.lists(code, min_size=3, max_size=3))
  for mode in losses.SS_MODES:
    (value, out), grads = _SS_VG[mode](codes_x, codes_y)
    assert all_finite(out) and all_finite(grads), (mode, out)
    assert np.all(np.asarray(jax.tree.leaves(out)) >= 0)


@pytest.mark.parametrize("mode", losses.SS_MODES)
@pytest.mark.parametrize("value", EXTREMES)
def test_ss_loss_gradient_finite_for_constant_codes(mode, value):
  codes = [[np.full(SHAPE, value, np.float32), np.full((2, 2), value, np.float32)]] * 3
  (_, out), grads = _SS_VG[mode](codes, codes)
  assert all_finite(out) and all_finite(grads)


@SETTINGS
@given(kind=st.sampled_from(losses.GAN_KINDS),
       real=st.lists(extreme_arrays(), min_size=2, max_size=2),
       fake=st.lists(extreme_arrays(), min_size=2, max_size=2))
def test_gan_losses_and_gradients_finite_for_extreme_logits(kind, real, fake):
  (_, (d, g)), grads = _GAN_VG[kind](real, fake)
  assert all_finite((d, g)) and all_finite(grads)
  assert d >= 0 and g >= 0


@SETTINGS
@given(data=st.data())
def test_other_losses_and_gradients_finite_for_extreme_inputs(data):
  n = 3
  a, b, x, x_rec = (data.draw(extreme_arrays()) for _ in range(4))
  preds = data.draw(st.lists(extreme_arrays(), min_size=n, max_size=n))
  cycles = data.draw(st.lists(extreme_arrays(), min_size=n, max_size=n))
  (_, out), grads = _REST_VG(a, b, x, preds, x_rec, cycles)
  assert all_finite(out) and all_finite(grads)


@pytest.mark.parametrize("value", EXTREMES)
def test_distance_gradients_finite_at_equal_inputs(value):
  a = jnp.full(SHAPE, value)
  for fn in (lambda a, b: jnp.sum(losses.ss_distance(a, b)), losses.l1_distance):
    ga, gb = jax.grad(fn, argnums=(0, 1))(a, a)
    assert all_finite((ga, gb))


# ------------------------------------------------------------------ jit, dtype


@pytest.mark.parametrize("mode", losses.SS_MODES)
def test_ss_loss_jittable(mode):
  rng = np.random.default_rng(0)
  codes_x = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(3)]
  codes_y = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(3)]
  fn = functools.partial(losses.ss_loss, lambda_intra=[0.5, 0.5, 0.5], lambda_inter=1.0,
                         mode=mode)
  eager, jitted = fn(codes_x, codes_y), jax.jit(fn)(codes_x, codes_y)
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, atol=1e-7)
  # Weights and alpha may be traced too (e.g. from a schedule).
  traced = jax.jit(lambda lam, alpha: losses.ss_loss(
      codes_x, codes_y, lambda_intra=lam, lambda_inter=lam[0], alpha=alpha,
      mode=mode)["ss"])(jnp.array([0.5, 0.5, 0.5]), 1.4)
  np.testing.assert_allclose(traced, fn(codes_x, codes_y, lambda_inter=0.5)["ss"],
                             rtol=1e-6, atol=1e-7)


def test_gan_losses_jittable_with_static_kind():
  real, fake = jnp.ones(SHAPE), -jnp.ones(SHAPE)
  for kind in losses.GAN_KINDS:
    np.testing.assert_allclose(
        jax.jit(losses.gan_d_loss, static_argnums=0)(kind, real, fake),
        losses.gan_d_loss(kind, real, fake), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        jax.jit(losses.gan_g_loss, static_argnums=0)(kind, fake),
        losses.gan_g_loss(kind, fake), rtol=1e-6, atol=1e-7)


def test_outputs_are_float32_for_float64_and_int_inputs():
  a64, i32 = np.ones(SHAPE, np.float64), np.zeros(SHAPE, np.int32)
  assert losses.ss_distance(a64, i32).dtype == jnp.float32
  assert losses.l1_distance(a64, i32).dtype == jnp.float32
  assert losses.nsgan_d_loss(a64, i32).dtype == jnp.float32
  assert losses.lsgan_g_loss(i32).dtype == jnp.float32
  assert losses.r1_penalty(a64).dtype == jnp.float32
  out = losses.ss_loss([a64, i32], [i32, a64], lambda_intra=[1, 1], lambda_inter=1)
  assert all(v.dtype == jnp.float32 for v in out.values())


# ------------------------------------------------------------------- errors


def test_bad_kind_raises():
  logits = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match=r"kind.*nsgan.*lsgan"):
    losses.gan_d_loss("wgan", logits, logits)
  with pytest.raises(ValueError, match=r"kind.*nsgan.*lsgan"):
    losses.gan_g_loss("hinge", logits)


def test_bad_mode_raises():
  codes = [jnp.zeros(SHAPE), jnp.ones(SHAPE)]
  with pytest.raises(ValueError, match=r"mode.*elementwise.*mean"):
    losses.ss_loss(codes, codes, lambda_intra=[1, 1], lambda_inter=1, mode="max")


def test_mismatched_lengths_raise():
  c = jnp.zeros(SHAPE)
  kw = dict(lambda_intra=[1, 1], lambda_inter=1)
  with pytest.raises(ValueError, match="codes_layers"):
    losses.ss_loss([c, c], [c, c, c], **kw)
  with pytest.raises(ValueError, match="lambda_intra"):
    losses.ss_loss([c, c, c], [c, c, c], **kw)
  with pytest.raises(ValueError, match="lambda_intra"):
    losses.ss_loss([c, c], [c, c], lambda_intra=0.5, lambda_inter=1)
  with pytest.raises(ValueError, match="codes_x"):
    losses.ss_loss([c], [c], lambda_intra=[1], lambda_inter=1)
  with pytest.raises(ValueError, match=r"codes_x\[1\]"):  # levels differ
    losses.ss_loss([[c, c], [c]], [[c, c], [c, c]], **kw)
  with pytest.raises(ValueError, match=r"codes_layers\[0\]"):  # shapes differ
    losses.ss_loss([c, c], [c[0], c], **kw)
  with pytest.raises(ValueError, match="alpha"):
    losses.ss_loss([c, c], [c, c], alpha=0.0, **kw)
  with pytest.raises(ValueError, match="alpha"):
    losses.ss_distance(c, c, alpha=-1.0)
  with pytest.raises(ValueError, match="real_logits and fake_logits"):
    losses.nsgan_d_loss([c, c], [c])
  with pytest.raises(ValueError, match="real_logits and fake_logits"):
    losses.lsgan_d_loss(c, [c, c])
  with pytest.raises(ValueError, match="fake_logits"):
    losses.nsgan_g_loss([])
  with pytest.raises(ValueError, match="layers_cycle"):
    losses.cycle_losses(c, [c, c], c, [c], lambda_x=1, lambda_layers=[1, 1])
  with pytest.raises(ValueError, match="lambda_layers"):
    losses.cycle_losses(c, [c, c], c, [c, c], lambda_x=1, lambda_layers=[1])
  with pytest.raises(ValueError, match="grad_real"):
    losses.r1_penalty(0.0)


# ------------------------------------------------------------------- remix


def _layer_batches(n):
  """A pair of [B, N, H, W, C] batches of layer images in [0, 1]."""
  shape = (2, n, 3, 3, 1)
  elems = st.floats(0.0, 1.0, width=32, allow_subnormal=False)
  return st.tuples(hnp.arrays(np.float32, shape, elements=elems), hnp.arrays(np.float32, shape, elements=elems))


@SETTINGS
@given(n=st.sampled_from([2, 3]), data=st.data())
def test_remix_loss_is_the_mean_l1_to_the_blended_samples(n, data):
  pred, real = data.draw(_layer_batches(n))
  got = float(losses.remix_loss(pred, real))
  assert got == pytest.approx(float(np.mean(np.abs(pred.astype(np.float64) - real))), rel=1e-5, abs=1e-7)
  assert got >= 0
  assert float(losses.remix_loss(real, real)) == 0.0
  # symmetric, and permuting the layer axis of both leaves it unchanged
  assert float(losses.remix_loss(real, pred)) == pytest.approx(got, rel=1e-6, abs=1e-8)
  perm = np.roll(np.arange(n), 1)
  assert float(losses.remix_loss(pred[:, perm], real[:, perm])) == pytest.approx(got, rel=1e-6, abs=1e-8)


def test_remix_loss_is_finite_for_extreme_inputs_and_checks_shapes():
  big = jnp.full((1, 2, 2, 2, 3), 1e6)
  value, grad = jax.value_and_grad(lambda p: losses.remix_loss(p, -big))(big)
  assert np.isfinite(float(value)) and all_finite(grad)
  with pytest.raises(ValueError, match="same shape"):
    losses.remix_loss(jnp.zeros((1, 2, 4, 4, 3)), jnp.zeros((1, 3, 4, 4, 3)))


def test_remix_loss_trains_a_separator_of_known_blends():
  """With known layers, the remix term alone recovers them: a per-pixel linear
  'separator' p_k = w_k x + b_k of blends x = y_1 + y_2 fitted by gradient descent
  reaches the split it is built to find (here y_1 = 0.25 x exactly)."""
  rng = np.random.default_rng(0)
  y1 = rng.uniform(0, 0.25, (64, 1))
  real = np.stack([y1, 3 * y1], axis=1).astype(np.float32)  # layer 2 = 3 x layer 1
  x = real.sum(axis=1)

  def loss(w):
    pred = jnp.stack([w[0] * x + w[1], w[2] * x + w[3]], axis=1)
    return losses.remix_loss(pred, real)

  w = jnp.zeros(4)
  opt = optax.adam(0.05)
  state = opt.init(w)
  for _ in range(400):
    g = jax.grad(loss)(w)
    upd, state = opt.update(g, state)
    w = optax.apply_updates(w, upd)
  assert float(loss(w)) < 5e-3
  assert float(w[0]) == pytest.approx(0.25, abs=0.03) and float(w[2]) == pytest.approx(0.75, abs=0.03)


def test_generator_objective_adds_the_weighted_remix_term():
  base = losses.generator_objective(2.0, 3.0, 4.0, lambda0=5.0, w1=1.0, w2=10.0)
  with_remix = losses.generator_objective(2.0, 3.0, 4.0, lambda0=5.0, w1=1.0, w2=10.0, remix=0.5,
                                          remix_weight=10.0)
  assert float(with_remix) == pytest.approx(float(base) + 5.0)
  assert float(losses.generator_objective(2.0, 3.0, 4.0, lambda0=5.0, remix=7.0)) == pytest.approx(21.0)
