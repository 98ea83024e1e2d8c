"""The CPU speed forms of the convs (sils_jax/cpu_kernels): the matrix, Winograd and
phase forms and the direct C++ FFI kernels, each against XLA's convolution
(``jax.lax.conv_general_dilated`` / ``conv_transpose``) and flax's ``nn.Conv`` /
``nn.ConvTranspose``: values, gradients and the R1-style second-order gradient; which
convs take which form; determinism, vmap and pmap; whole models and a train step with
the CPU layers against flax's; the fallback without a compiler; and a project that
trains with the wing not importable.

Tests of the C++ kernels skip, with the reason, where ``ffi.load()`` fails.
"""

import json
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sils_jax import cpu_kernels
from sils_jax.cpu_kernels import Rules, conv, ffi, upconv
from sils_jax.models.discriminator import LayerDiscriminators
from sils_jax.models.separator import LayerSeparator
from sils_jax.models.unet import Decoder, Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MATRIX = Rules(direct=False, winograd=False)  # patches x matrix and shift forms only
WINOGRAD = Rules(direct=False)  # plus Winograd for the large 4x4 stride-2 convs
DIRECT = Rules(direct=True)  # plus the FFI kernels: only once ffi.load() succeeded (``kernels``)
_DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def kernels():
  """Skips the test, with the reason, where the direct-conv kernels did not load."""
  if not ffi.load():
    pytest.skip(f"direct-conv kernels unavailable: {ffi.unavailable_reason()}")


def lax_conv(x, w, strides=(1, 1), padding="SAME"):
  """XLA's convolution: the reference (flax's nn.Conv runs the same)."""
  return jax.lax.conv_general_dilated(x, w, tuple(strides), padding, dimension_numbers=_DN)


def lax_conv_transpose(x, k):
  """XLA's 4x4 stride-2 'SAME' transposed conv, as ``nn.ConvTranspose`` runs it."""
  return jax.lax.conv_transpose(x, k, (2, 2), "SAME", dimension_numbers=_DN)


def _assert_equal_to_second_order(layer, ref, x, w):
  """Values, gradients and the R1-style second-order gradient (of |dL/dx|^2 with
  respect to both inputs) of ``layer(x, w)``, jitted, against ``ref(x, w)``."""

  def loss(f):
    return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

  def r1(f):
    return lambda w, x: jnp.sum(jax.grad(loss(f))(x, w) ** 2)

  out = jax.jit(layer)(x, w)
  np.testing.assert_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(out)))))
  for fn, args in ((loss, (x, w)), (r1, (w, x))):
    got = jax.jit(jax.grad(fn(layer), (0, 1)))(*args)
    want = jax.grad(fn(ref), (0, 1))(*args)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  return out


def _conv_pair(strides, padding, rules):
  return (lambda x, w: conv.conv2d(x, w, strides, padding, rules),
          lambda x, w: lax_conv(x, w, strides, padding))


def _jaxpr_of_grad(f, *args) -> str:
  """The jaxpr of f's forward pass and its gradient (every FFI call they make)."""
  return str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a)), tuple(range(len(args)))))(*args))


# ---------------------------------------------------------------------------
# The matrix and Winograd forms (conv.py)


@pytest.mark.parametrize("shape,kernel,strides", [
    ((2, 8, 8, 3), (4, 4), (2, 2)),   # encoder / discriminator conv
    ((1, 5, 7, 4), (4, 4), (2, 2)),   # odd sizes: asymmetric SAME padding
    ((2, 6, 6, 5), (3, 3), (1, 1)),   # output conv
    ((1, 4, 4, 6), (1, 1), (1, 1)),   # discriminator logits
])
def test_matrix_conv_equals_xla_conv_values_and_gradients(shape, kernel, strides):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, kernel + (shape[-1], 7)) * 0.3
  f, ref = _conv_pair(strides, "SAME", MATRIX)
  np.testing.assert_allclose(f(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda g: (lambda x, w: jnp.sum(jnp.sin(g(x, w))))
  for a, b in zip(jax.grad(loss(f), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv2d_rejects_bad_padding_and_channels():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 1))
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'"):
    conv.conv2d(x, w, (1, 1), "CIRCULAR")
  with pytest.raises(ValueError, match="input has 2 channels, kernel expects 3"):
    conv.conv2d(x, jnp.zeros((3, 3, 3, 1)))


# (input shape, kernel, strides, padding, output channels): every form of the matrix
# conv's custom gradient (odd sizes: test_matrix_conv_equals_xla_conv_values_and_
# gradients). Stride 2 / 3 run as space-to-depth blocks (split pieces); narrowing convs
# (C > F in the blocked frame) run in the shift form; the input gradient is
# 'correlate' or 'scatter' by positions * (C - F) > C * F.
_WINDOW_CASES = [
    ((2, 8, 8, 3), (4, 4), (2, 2), "SAME", 5),    # blocks of 12 channels -> 5: shift, correlate
    ((2, 6, 6, 2), (4, 4), (2, 2), "SAME", 16),   # widening: patches, scatter
    ((1, 9, 9, 2), (6, 6), (3, 3), "SAME", 4),    # stride 3
    ((2, 6, 6, 16), (3, 3), (1, 1), "SAME", 3),   # the decoder's output conv
    ((1, 5, 5, 4), (2, 2), (1, 1), "VALID", 9),   # the phases up-conv
    ((1, 2, 2, 8), (2, 2), (1, 1), "VALID", 6),   # one position: shift, scatter
]


def test_matrix_conv_forms_equal_xla_conv_to_second_order():
  """Every matrix form against XLA's convolution to the second order; and the cases
  cover every (forward form, input-gradient form) pair."""
  seen = set()
  for shape, kernel, strides, padding, cout in _WINDOW_CASES:
    kx, kw = jax.random.split(jax.random.key(len(seen)))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, kernel + (shape[-1], cout)) * 0.3
    out = _assert_equal_to_second_order(*_conv_pair(strides, padding, MATRIX), x, w)
    s = strides[0]
    ka = kernel[0] // s
    kmat = jnp.zeros((ka * ka * s * s * shape[-1], cout))  # the blocked frame's kernel matrix
    seen.add((conv._narrows(kmat, ka, ka), conv._correlates(out.shape, kmat, ka, ka)))
  assert seen == {(True, True), (True, False), (False, False)}  # widening never correlates


def test_matrix_conv_shift_form_keeps_16_bit_inputs_accurate_and_typed():
  """The narrowing form adds its taps' partial sums in float32 and rounds once: the
  bfloat16 result is as close to the float32 conv as one bfloat16 rounding."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3)) * 0.3
  assert conv._narrows(w.reshape(9 * 16, 3), 3, 3)
  want = lax_conv(x, w)
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  got = jax.jit(lambda x, w: conv.conv2d(x, w, (1, 1), "SAME", WINOGRAD))(x16, w16)
  assert got.dtype == jnp.bfloat16
  ref16 = lax_conv(x16.astype(jnp.float32), w16.astype(jnp.float32))
  # inputs rounded to bfloat16 give ref16; the output's own rounding is 2^-8 relative
  np.testing.assert_allclose(got.astype(jnp.float32), ref16, rtol=2 ** -8, atol=1e-2)
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.1


# (input shape, output channels): 4x4 stride-2 convs that run as Winograd's F(2x2, 2x2)
# once they have enough positions (``conv._winograd_pays``; the threshold is lowered
# here to keep the test small): even and odd sizes (SAME padding, an odd tile count
# cropped after).
_WINOGRAD_CASES = [((4, 16, 16, 16), 32), ((1, 33, 31, 16), 20)]


@pytest.mark.parametrize("shape,cout", _WINOGRAD_CASES)
def test_winograd_conv_equals_xla_conv_to_second_order(shape, cout):
  rules = Rules(direct=False, winograd_min_positions=1)
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], cout)) * 0.1
  b, h, wd, _ = shape
  positions = b * -(-h // 2) * -(-wd // 2)
  assert conv._winograd_pays(w.shape, (2, 2), positions, x.dtype, rules)
  assert not conv._winograd_pays(w.shape, (2, 2), positions, x.dtype, WINOGRAD)  # below the default threshold
  _assert_equal_to_second_order(*_conv_pair((2, 2), "SAME", rules), x, w)


@pytest.mark.parametrize("shape", [(2, 9, 7, 4), (1, 8, 8, 5), (1, 2, 3, 2)])
def test_winograd_2x2_equals_the_valid_conv_and_its_transforms_are_adjoint(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (2, 2, shape[-1], 6))
  np.testing.assert_allclose(conv.winograd_2x2(x, k), lax_conv(x, k, (1, 1), "VALID"), rtol=1e-5, atol=1e-5)
  # the hand-written transposes: <tile(x), u> == <x, untile(u)> for every axis
  xo = jnp.pad(x, ((0, 0), (0, 1 - shape[1] % 2), (0, 1 - shape[2] % 2), (0, 0)))  # odd sizes
  for axis in (1, 2):
    t = conv._tile3(xo, axis)
    u = jax.random.normal(jax.random.key(2), t.shape)
    np.testing.assert_allclose(jnp.vdot(t, u), jnp.vdot(xo, conv._untile3(u, axis)), rtol=1e-5)


# (name, f, its hand-written transpose, static arguments, input shape): the linear maps
# of the conv forms whose gradients are written out, each the other's custom VJP
_LINEAR_PAIRS = [
    ("patches", conv._patches, conv._col2im, (2, 2, 2), (2, 6, 5, 6)),
    ("patches 3x3", conv._patches, conv._col2im, (3, 3, 1), (1, 7, 8, 3)),
    ("shifted sum", conv._shifted_sum, conv._shifted_stack, (2, 3), (2, 5, 6, 6, 4)),
    ("phases", upconv.interleave_phases, upconv.scatter_phases, (), (2, 4, 6, 2, 2, 3)),
    ("tile3 rows", conv._tile3, conv._untile3, (1,), (2, 7, 4, 3)),
    ("tile3 columns", conv._tile3, conv._untile3, (2,), (2, 4, 5, 3)),
    ("untile2 rows", conv._untile2, conv._tile2, (1,), (3, 2, 3, 4, 5)),
    ("untile2 columns", conv._untile2, conv._tile2, (2,), (3, 2, 3, 4, 5)),
]


@pytest.mark.parametrize("case", _LINEAR_PAIRS, ids=[c[0] for c in _LINEAR_PAIRS])
def test_hand_written_transposes_are_adjoint_and_equal_autodiff(case):
  """<f(x), y> == <x, f^T(y)>, and f's gradient (f^T, and f^T's gradient f) is what
  autodiff of the plain function gives, so every order of the conv's gradients is
  exact (the R1 penalty differentiates input gradients again)."""
  name, f, ft, static, shape = case
  x = jax.random.normal(jax.random.key(0), shape)
  fx = f(x, *static)
  y = jax.random.normal(jax.random.key(1), fx.shape)
  assert ft(y, *static).shape == x.shape, name
  np.testing.assert_allclose(jnp.vdot(fx, y), jnp.vdot(x, ft(y, *static)), rtol=1e-5, err_msg=name)
  for fn, arg, cot in ((f, x, y), (ft, y, x)):
    got = jax.vjp(lambda v: fn(v, *static), arg)[1](cot)[0]
    want = jax.vjp(lambda v: fn.fun(v, *static), arg)[1](cot)[0]  # autodiff of the plain function
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_winograd_does_nine_sixteenths_of_the_products():
  """The point of the form: fewer multiply-adds in the compiled conv (forward), and
  the rules the model runs with (``cpu_kernels.rules()``) take it at 2048 positions,
  the direct kernels or not."""
  x = jnp.ones((2, 64, 64, 32))  # 2048 output positions: Winograd, not the direct kernels
  w = jnp.ones((4, 4, 32, 64))

  def flops(rules):
    cost = jax.jit(lambda x, w: conv.conv2d(x, w, (2, 2), "SAME", rules)).lower(x, w).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]
  direct = 2 * 2 * 32 * 32 * 16 * 32 * 64  # the conv's multiply-adds, x2
  assert flops(MATRIX) >= 0.99 * direct
  assert flops(WINOGRAD) < 0.6 * direct
  assert flops(cpu_kernels.rules()) == flops(WINOGRAD)
  # 16-bit inputs keep the matrix form (the transforms' sums would round in bfloat16)
  assert not conv._winograd_pays(w.shape, (2, 2), 2 * 32 * 32, jnp.bfloat16, WINOGRAD)


# ---------------------------------------------------------------------------
# The up-conv's phase form (upconv.py)


# the up-conv's forms: 'phases' (the CPU's), 'subpixel' (what layers() passes elsewhere)
_FORMS = getattr(upconv, "FORMS", ("phases",))


@pytest.mark.parametrize("form", _FORMS)
@pytest.mark.parametrize("shape,features", [((2, 5, 7, 3), 4), ((1, 8, 8, 16), 8), ((3, 1, 2, 2), 1)])
def test_up_conv_forms_equal_flax_conv_transpose(form, shape, features):
  """cpu_kernels.ConvTranspose in each form against nn.ConvTranspose on the same
  parameters (a non-zero bias too, so its layout is checked): values and parameter
  gradients; and the kernel alone to the second order against XLA's transposed conv."""
  x = jax.random.normal(jax.random.key(0, impl="rbg"), shape)
  ref = nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME")
  module = cpu_kernels.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME", rules=WINOGRAD,
                                     **({} if form == "phases" else {"form": form}))
  params = ref.init(jax.random.key(1, impl="rbg"), x)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2, impl="rbg"), a.shape), params)
  want = ref.apply(params, x)
  got = module.apply(params, x)
  assert got.shape == want.shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
  g_got = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_got)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  no_bias = module.clone(use_bias=False)
  _assert_equal_to_second_order(lambda x, k: no_bias.apply({"params": {"kernel": k}}, x), lax_conv_transpose,
                                x, params["params"]["kernel"])


@pytest.mark.parametrize("form", _FORMS)
def test_up_conv_kernel_mapping_has_no_gather_or_scatter(form):
  # The 4x4 kernel's mapping to the conv layout is static: indexing it with a tap
  # table lowers to a gather, whose gradient is a scatter-add into a fresh zero
  # buffer of the kernel's size every step (12% of the CPU step at batch 1,
  # benchmarks/README.md). Checked on the lowered gradient, before XLA's passes.
  module = cpu_kernels.ConvTranspose(8, (4, 4), (2, 2), rules=MATRIX, **({} if form == "phases" else {"form": form}))
  x = jnp.ones((1, 4, 4, 16))
  params = module.init(jax.random.key(0, impl="rbg"), x)
  text = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))).lower(params).as_text()
  assert "gather" not in text and "scatter" not in text


def test_cpu_layers_are_drop_ins_with_flax_parameters():
  """The same parameter names, shapes, initialisers and so values as flax's layers
  (checkpoints are interchangeable); other up-conv shapes are refused, never wrong."""
  x = jax.random.normal(jax.random.key(0, impl="rbg"), (2, 4, 6, 5))
  key = jax.random.key(1, impl="rbg")
  for ours, theirs in [
      (cpu_kernels.ConvTranspose(3, (4, 4), (2, 2), "SAME"), nn.ConvTranspose(3, (4, 4), (2, 2), "SAME")),
      (cpu_kernels.Conv(7, (4, 4), 2, use_bias=False), nn.Conv(7, (4, 4), 2, use_bias=False)),
      (cpu_kernels.Conv(3, (3, 3), kernel_init=nn.initializers.normal(0.02)),
       nn.Conv(3, (3, 3), kernel_init=nn.initializers.normal(0.02)))]:
    a, b = ours.init(key, x), theirs.init(key, x)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(ours.apply(b, x), theirs.apply(b, x), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="4x4 stride-2 'SAME' up-convs only"):
    cpu_kernels.ConvTranspose(4, (3, 3), (1, 1)).init(key, x)
  with pytest.raises(ValueError, match="4x4 stride-2 'SAME' up-convs only"):
    cpu_kernels.ConvTranspose(4, (4, 4), (2, 2), "VALID").init(key, x)
  if len(_FORMS) > 1:
    with pytest.raises(ValueError, match="form must be one of"):
      cpu_kernels.ConvTranspose(4, (4, 4), (2, 2), form="bilinear").init(key, x)


# ---------------------------------------------------------------------------
# The plug-in: layers(), and whole models with them


def test_layers_are_the_cpu_forms_only_for_auto_on_the_cpu():
  from sils_jax.training import config_checks
  from sils_jax.training.state import conv_layers
  from tiny_config import tiny_config
  assert cpu_kernels.layers("off", "cpu") == cpu_kernels.layers("off", "gpu") == {}
  # elsewhere, flax's convs; at most the up-conv's sub-pixel form (test_up_conv_forms_
  # equal_flax_conv_transpose), never the CPU forms
  for backend in ("gpu", "tpu"):
    other = cpu_kernels.layers("auto", backend)
    assert set(other) <= {"conv_transpose"}, other
    assert all(v.func is cpu_kernels.ConvTranspose and v.keywords == {"form": "subpixel"}
               for v in other.values()), other
  with pytest.raises(ValueError, match="config.cpu_kernels"):
    cpu_kernels.layers("fast", "cpu")
  with pytest.raises(ValueError, match="config.cpu_kernels"):
    cpu_kernels.layers("fast", "gpu")  # checked whatever the backend
  lay = cpu_kernels.layers("auto", "cpu")
  assert sorted(lay) == ["conv", "conv_transpose"]
  assert lay["conv"].func is cpu_kernels.Conv and lay["conv_transpose"].func is cpu_kernels.ConvTranspose
  assert lay["conv"].keywords["rules"] == lay["conv_transpose"].keywords["rules"] == cpu_kernels.rules()
  assert cpu_kernels.rules() == Rules(direct=ffi.load()) and cpu_kernels.rules(direct=False) == WINOGRAD
  assert config_checks.CPU_KERNELS == cpu_kernels.MODES  # the config check's copy of the modes
  c = tiny_config()
  assert c.cpu_kernels == "off" and conv_layers(c) == {}
  c.cpu_kernels = "auto"
  assert conv_layers(c).keys() == lay.keys()


def _assert_trees_close(got, want, rtol=1e-4):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


def test_models_with_the_cpu_layers_equal_the_models_with_flax_layers():
  """LayerSeparator and LayerDiscriminators (the paper's widths) built with
  ``layers('auto', 'cpu')`` and with flax's defaults, on the same parameters: the same
  outputs, parameter gradients and (discriminators) input gradients; every conv of
  theirs takes the CPU forms."""
  lay = cpu_kernels.layers("auto", "cpu")
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (2, 32, 32, 3))
  sep_ref, sep = LayerSeparator(num_layers=2), LayerSeparator(num_layers=2, **lay)
  v = sep_ref.init(jax.random.key(1, impl="rbg"), x)
  assert jax.tree.map(jnp.shape, sep.init(jax.random.key(1, impl="rbg"), x)) == jax.tree.map(jnp.shape, v)

  def g_loss(model):
    def f(params):
      out, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.sum(jnp.sin(3 * out)), (out, upd["batch_stats"])
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (_, want), g_want = g_loss(sep_ref)(v["params"])
  (_, got), g_got = g_loss(sep)(v["params"])
  _assert_trees_close(got, want)  # the layers and the updated BatchNorm statistics
  _assert_trees_close(g_got, g_want)
  no_xla_convs = lambda f, *a: "conv_general_dilated" not in str(jax.make_jaxpr(f)(*a))
  assert no_xla_convs(lambda p: sep.apply({"params": p, "batch_stats": v["batch_stats"]}, x), v["params"])

  disc_ref, disc = LayerDiscriminators(num_layers=2, num_branches=2), LayerDiscriminators(
      num_layers=2, num_branches=2, conv=lay["conv"])
  layers = jnp.stack([x, x[::-1]], axis=1)
  dv = disc_ref.init(jax.random.key(2, impl="rbg"), layers)

  def d_loss(model):
    f = lambda p, y: sum(jnp.sum(jnp.sin(3 * o)) for outs in model.apply(p, y) for o in outs)
    return jax.jit(lambda p, y: (model.apply(p, y), jax.grad(f, (0, 1))(p, y)))

  _assert_trees_close(d_loss(disc)(dv, layers), d_loss(disc_ref)(dv, layers))
  assert no_xla_convs(lambda p: disc.apply(p, layers), dv)


def _one_step(config, layers):
  """create_states and one pmapped train step with the given conv layers."""
  import functools
  from sils_jax.training import loop
  from sils_jax.training.devices import replicate, shard, unreplicate
  from sils_jax.training.state import AXIS, create_states, init_key
  from sils_jax.training.step import LossConfig, train_step
  g, d = create_states(config, init_key(config.seed), layers=layers)
  step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS)
  batch = loop.make_dataset(config).train_batch(0, config.per_device_batch_size)
  g1, d1, m = step(replicate(g), replicate(d), shard(batch))
  return g, d, unreplicate(g1), unreplicate(d1), {k: float(v) for k, v in unreplicate(m).items()}


def test_train_step_with_the_cpu_layers_matches_flax_layers():
  """One train step of a model with 16k channels, whose every conv, the 3-channel first
  ones included, but the discriminators' 1x1 logits runs in the direct kernels where
  they loaded (the R1 penalty's second order included), else in the matrix and
  Winograd forms, against flax's layers: the same losses and updated parameters to
  float rounding."""
  from tiny_config import tiny_config
  c = tiny_config()
  c.encoder_features = (16, 16, 16, 16, 16)
  c.decoder_features = (16, 16, 16, 16, 16)
  c.disc_features = (16, 16, 16, 16)
  a = _one_step(c, {})
  b = _one_step(c, cpu_kernels.layers("auto", "cpu"))
  for x, y in zip(jax.tree.leaves((a[0].params, a[1].params)), jax.tree.leaves((b[0].params, b[1].params))):
    np.testing.assert_array_equal(x, y)  # the same initial parameters
  for k in a[4]:
    assert b[4][k] == pytest.approx(a[4][k], rel=1e-4, abs=1e-6), k
  for x, y in zip(jax.tree.leaves((a[2].params, a[3].params)), jax.tree.leaves((b[2].params, b[3].params))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


_WING_BLOCKED = r"""
import importlib.abc, json, logging, math, sys, tempfile

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "sils_jax.cpu_kernels" or name.startswith("sils_jax.cpu_kernels."):
      raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
    return None

sys.meta_path.insert(0, Blocked())
messages = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: messages.append(record.getMessage())
logging.getLogger("absl").addHandler(handler)
sys.path.insert(0, "tests")
from tiny_config import tiny_config
from sils_jax.training import loop
c = tiny_config()
c.cpu_kernels = "auto"
with tempfile.TemporaryDirectory() as workdir:
  result = loop.train_and_evaluate(c, workdir)
numbers = {k: v for k, v in result.items() if isinstance(v, (int, float))}
print(json.dumps({"result": numbers, "messages": messages,
                  "finite": all(math.isfinite(v) for v in numbers.values()),
                  "imported": sorted(m for m in sys.modules if m.startswith("sils_jax.cpu_kernels"))}))
"""


def test_trains_with_the_wing_not_importable():
  """The wing is optional: with ``sils_jax.cpu_kernels`` not importable,
  ``cpu_kernels='auto'`` trains with flax's layers (finite metrics) and says why."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _WING_BLOCKED], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["result"]["step"] == 2 and len(report["result"]) > 1 and report["finite"], report
  assert report["imported"] == [], report
  assert any("sils_jax.cpu_kernels cannot be imported" in m for m in report["messages"]), report["messages"]


# ---------------------------------------------------------------------------
# The direct C++ kernels (ffi.py, direct_conv.cc)


def test_kernels_build_wherever_a_compiler_is_found():
  """A machine with a C++ compiler and jaxlib's FFI headers must get the kernels, or
  'auto' silently loses them: the build error is the failure message."""
  if ffi._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  assert ffi.load(), ffi.unavailable_reason()


# (input shape, output channels): the output conv at 2 sizes, 32 input channels (two
# vectors), one and two outputs, images narrower or shorter than the kernel (every
# pixel on the border)
_CASES = [((2, 6, 6, 16), 3), ((1, 9, 7, 16), 3), ((2, 5, 4, 32), 1), ((1, 1, 1, 16), 2),
          ((3, 2, 9, 16), 3), ((1, 8, 2, 32), 2),
          ((1, 4, 17, 16), 3)]  # the input gradient's 8-, 4-, 2- and 1-pixel blocks of an inner row


@pytest.mark.parametrize("shape,cout", _CASES)
def test_direct_conv_equals_xla_conv_to_second_order(kernels, shape, cout):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], cout)) * 0.3
  assert ffi.supports(w.shape, (1, 1), "SAME", x.dtype)
  f, ref = _conv_pair((1, 1), "SAME", DIRECT)
  assert f"{ffi.PREFIX}_fwd" in str(jax.make_jaxpr(f)(x, w))
  # conv2d's own check: values, gradients and the R1-style second-order gradient
  _assert_equal_to_second_order(f, ref, x, w)
  # and each of the three kernels' own derivatives (the weight gradient's included)
  dy = jax.random.normal(jax.random.key(2), shape[:3] + (cout,))
  pairs = [(ffi.conv3x3, lax_conv, (x, w)),
           (ffi.conv3x3_input_grad, lambda dy, w: jax.vjp(lambda x: lax_conv(x, w), x)[1](dy)[0], (dy, w)),
           (lambda x, dy: ffi.conv3x3_weight_grad(x, dy, w.shape),
            lambda x, dy: jax.vjp(lambda w: lax_conv(x, w), w)[1](dy)[0], (x, dy))]
  for got_fn, want_fn, args in pairs:
    got, want = jax.jit(got_fn)(*args), want_fn(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
    for a, b in zip(jax.grad(loss(got_fn), (0, 1))(*args), jax.grad(loss(want_fn), (0, 1))(*args)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


# (input shape, features): the decoder's up-convs' channel counts (16/32/64/128 in,
# 16/32/64 out) at small sizes, odd and one-pixel ones (every column on the border)
_UP_CASES = [((2, 3, 4, 16), 16), ((1, 5, 6, 32), 16), ((2, 4, 4, 16), 32), ((1, 3, 3, 128), 64),
             ((1, 1, 1, 16), 16), ((1, 2, 9, 64), 16), ((1, 9, 2, 16), 32),
             ((1, 2, 21, 16), 16), ((1, 3, 12, 32), 16)]  # the input gradient's full 16- and 8-pixel blocks


@pytest.mark.parametrize("shape,features", _UP_CASES)
def test_direct_up_conv_equals_the_transposed_conv_to_second_order(kernels, shape, features):
  """The phase form in the kernels against flax's ConvTranspose and XLA's transposed
  conv: values, gradients, and the gradient of |dL/dx|^2."""
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], features)) * 0.2
  assert ffi.supports_up(shape[-1], features, x.dtype)
  f = lambda x, k: upconv.phase_conv_transpose(x, k, DIRECT)
  assert f"{ffi.PREFIX}_up_fwd" in str(jax.make_jaxpr(f)(x, k))
  out = jax.jit(f)(x, k)
  flax_out = nn.ConvTranspose(features, (4, 4), (2, 2), "SAME", use_bias=False).apply({"params": {"kernel": k}}, x)
  np.testing.assert_allclose(out, flax_out, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(flax_out))))
  _assert_equal_to_second_order(f, lax_conv_transpose, x, k)


# (input shape, output channels): 4x4 stride-2 'SAME' convs of even-sized inputs with
# 16k input and output channels (the encoders' and discriminators' but the first),
# including one-pixel outputs and more output channels than one block of 4 vectors
_STRIDED_CASES = [((2, 8, 8, 16), 16), ((1, 6, 10, 32), 32), ((2, 4, 4, 64), 64), ((1, 2, 2, 16), 128),
                  ((1, 12, 4, 64), 48), ((1, 4, 4, 128), 16), ((1, 2, 4, 16), 256)]
# the first convs, on 1-4 channel images (s2_input_grad_small: chunks of 16 output rows
# with a halo row each side, so 70 rows are three chunks; one-pixel-wide outputs; the
# weight gradient's partial channel block; outputs 19 and 15 pixels wide: full blocks of
# 8 (6 for 4 channels) pixels, then the smaller ones)
_STRIDED_SMALL_CASES = [((2, 8, 8, 3), 16), ((1, 70, 12, 3), 32), ((2, 6, 2, 1), 64), ((1, 34, 10, 2), 16),
                        ((1, 4, 6, 4), 32), ((3, 2, 2, 3), 16), ((1, 4, 38, 3), 16), ((1, 4, 30, 4), 32)]


@pytest.mark.parametrize("shape,cout", _STRIDED_CASES + _STRIDED_SMALL_CASES)
def test_direct_strided_conv_equals_xla_conv_to_second_order(kernels, shape, cout):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], cout)) * 0.2
  assert ffi.supports_strided(x.shape, w.shape, (2, 2), "SAME", x.dtype)
  f, ref = _conv_pair((2, 2), "SAME", DIRECT)
  assert f"{ffi.PREFIX}_s2_fwd" in str(jax.make_jaxpr(f)(x, w))
  _assert_equal_to_second_order(f, ref, x, w)


def test_direct_kernels_run_only_the_convs_they_support(kernels):
  """With the kernels (``Rules(direct=True)``, what ``layers('auto', 'cpu')`` passes
  once they loaded) the output conv (3x3, 16 -> 3, float32), the up-convs and the 4x4
  stride-2 convs they support run as FFI calls; other shapes, strides, paddings and
  dtypes, and every conv without ``direct``, keep the matrix and Winograd forms."""
  def runs_direct(shape, kernel, strides="11", padding="SAME", dtype=jnp.float32, rules=DIRECT):
    s = tuple(int(c) for c in strides)
    text = _jaxpr_of_grad(lambda x, w: conv.conv2d(x, w, s, padding, rules), jnp.zeros(shape, dtype),
                          jnp.zeros(kernel, dtype))
    return f"{ffi.PREFIX}_" in text  # any of the kernels
  assert cpu_kernels.rules() == DIRECT
  assert runs_direct((2, 8, 8, 16), (3, 3, 16, 3))
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), rules=WINOGRAD)
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), rules=MATRIX)
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 4))  # 4 outputs
  assert not runs_direct((2, 8, 8, 8), (3, 3, 8, 3))  # 8 input channels
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), strides="22")
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), padding="VALID")
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 3))
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), dtype=jnp.bfloat16)

  def up_runs_direct(cin, features, dtype=jnp.float32, rules=DIRECT):
    text = _jaxpr_of_grad(lambda x, k: upconv.phase_conv_transpose(x, k, rules), jnp.zeros((2, 4, 4, cin), dtype),
                          jnp.zeros((4, 4, cin, features), dtype))
    return f"{ffi.PREFIX}_up_fwd" in text
  assert up_runs_direct(32, 16) and up_runs_direct(128, 64) and up_runs_direct(16, 16)
  assert not up_runs_direct(32, 16, rules=WINOGRAD)
  assert not up_runs_direct(256, 64)  # more input channels than the kernels' templates
  assert not up_runs_direct(32, 8)
  assert not up_runs_direct(32, 16, dtype=jnp.bfloat16)
  # 4x4 stride-2: 16k channels, even sizes, float32; not where Winograd pays over fewer
  # than direct_over_winograd_positions positions
  assert runs_direct((2, 8, 8, 16), (4, 4, 16, 32), strides="22")
  assert runs_direct((2, 8, 8, 3), (4, 4, 3, 16), strides="22")  # the first convs
  assert runs_direct((2, 8, 8, 1), (4, 4, 1, 64), strides="22")
  assert not runs_direct((2, 8, 8, 3), (4, 4, 3, 48), strides="22")  # F of 16, 32, 64 only there
  assert not runs_direct((2, 8, 8, 5), (4, 4, 5, 16), strides="22")
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 8), strides="22")
  assert not runs_direct((2, 9, 9, 16), (4, 4, 16, 32), strides="22")  # odd size
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 32), strides="22", dtype=jnp.bfloat16)
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 32), strides="22", rules=WINOGRAD)
  assert DIRECT.direct_over_winograd_positions == 8192
  # Winograd's at 2048 positions, the kernels' from 8192
  assert not runs_direct((2, 64, 64, 32), (4, 4, 32, 64), strides="22")
  assert runs_direct((8, 64, 64, 32), (4, 4, 32, 64), strides="22")
  assert not runs_direct((8, 64, 64, 32), (4, 4, 32, 64), strides="22",
                         rules=Rules(direct=True, direct_over_winograd_positions=2 ** 20))
  # in the model, with layers('auto', 'cpu'): the decoder's output conv and its last
  # three up-convs (256 -> 128 and 256 -> 64 channels stay in XLA's forms), and every
  # encoder conv at batch 1, the first (3 input channels) included
  lay = cpu_kernels.layers("auto", "cpu")
  x = jnp.zeros((1, 32, 32, 3))
  enc = Encoder(conv=lay["conv"])
  ev = enc.init(jax.random.key(2, impl="rbg"), x, train=False)
  assert str(jax.make_jaxpr(lambda x: enc.apply(ev, x, train=False))(x)).count(f"{ffi.PREFIX}_s2_fwd") == 5
  feats = enc.apply(ev, x, train=False)
  dec = Decoder(**lay)
  v = dec.init(jax.random.key(1, impl="rbg"), feats, train=False)
  text = str(jax.make_jaxpr(lambda f: dec.apply(v, f, train=False))(feats))
  assert text.count(f"{ffi.PREFIX}_fwd") == 1 and text.count(f"{ffi.PREFIX}_up_fwd") == 3


def test_direct_conv_is_deterministic(kernels):
  """Fixed chunks of rows, partial weight gradients added in chunk order: the same bits
  on every call, whichever thread runs which chunk (output conv, up-conv, and the
  strided conv of a 3-channel image)."""
  def same_bits_every_call(apply, input_grad, weight_grad, x, w, dy):
    f = jax.jit(lambda x, w, dy: (apply(x, w), input_grad(dy, w), weight_grad(x, dy, w.shape)))
    first = f(x, w, dy)
    for _ in range(3):
      for a, b in zip(f(x, w, dy), first):
        np.testing.assert_array_equal(a, b)

  normal = lambda seed, shape: jax.random.normal(jax.random.key(seed), shape)
  x = normal(0, (4, 64, 64, 16))
  same_bits_every_call(ffi.conv3x3, ffi.conv3x3_input_grad, ffi.conv3x3_weight_grad,
                       x, normal(2, (3, 3, 16, 3)), normal(1, (4, 64, 64, 3)))
  same_bits_every_call(ffi.up_conv, ffi.up_conv_input_grad, ffi.up_conv_weight_grad,
                       x, normal(3, (2, 2, 16, 2, 2, 16)), normal(4, (4, 128, 128, 16)))
  # the strided conv on a 3-channel image: each thread's buffer of the input gradient
  same_bits_every_call(ffi.strided_conv, ffi.strided_conv_input_grad, ffi.strided_conv_weight_grad,
                       normal(5, (4, 96, 64, 3)), normal(6, (4, 4, 3, 32)), normal(7, (4, 48, 32, 32)))


def _kernel_from_phases(k6):
  """The inverse of upconv.phase_kernel (a permutation of the taps), for the phase
  layout (2, 2, C, 2, 2, F): tap 2a + p of each axis is window offset a of phase p."""
  c, f = k6.shape[2], k6.shape[5]
  return jnp.transpose(k6, (0, 3, 1, 4, 2, 5)).reshape(4, 4, c, f)


def test_weight_gradients_over_many_rows(kernels):
  """More rows than 16 chunks of 8: the weight-gradient kernels take more rows per chunk
  (their partials stay at 16 kernel-sized buffers) and still sum every row once."""
  x = jax.random.normal(jax.random.key(0), (8, 160, 6, 16))  # 640 output rows for the strided conv
  dy = jax.random.normal(jax.random.key(1), (8, 80, 3, 16))
  got = ffi.strided_conv_weight_grad(x, dy, (4, 4, 16, 16))
  want = jax.vjp(lambda w: lax_conv(x, w, (2, 2)), jnp.zeros((4, 4, 16, 16)))[1](dy)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  xu = jax.random.normal(jax.random.key(2), (8, 80, 3, 16))  # 640 input rows for the up-conv
  dz = jax.random.normal(jax.random.key(3), (8, 160, 6, 16))
  k = jax.random.normal(jax.random.key(4), (2, 2, 16, 2, 2, 16))
  np.testing.assert_array_equal(upconv.phase_kernel(_kernel_from_phases(k)).reshape(k.shape), k)
  got = ffi.up_conv_weight_grad(xu, dz, k.shape)
  want = jax.vjp(lambda k6: lax_conv_transpose(xu, _kernel_from_phases(k6)), k)[1](dz)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_direct_conv_under_vmap_and_with_many_devices(kernels):
  x = jax.random.normal(jax.random.key(0), (3, 2, 5, 6, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
  got = jax.vmap(lambda x: ffi.conv3x3(x, w))(x)
  np.testing.assert_allclose(got, jax.vmap(lambda x: lax_conv(x, w))(x), rtol=1e-5, atol=1e-5)
  # pmap over 8 fake CPU devices (a subprocess: the device count is fixed at start-up)
  code = """
import jax, jax.numpy as jnp, numpy as np
from sils_jax.cpu_kernels import ffi
assert jax.device_count() == 8 and ffi.load(), ffi.unavailable_reason()
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
x = jax.random.normal(jax.random.key(0), (8, 2, 16, 16, 16))
w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
loss = lambda w, x: jnp.sum(jnp.sin(ffi.conv3x3(x, w)))
g = jax.pmap(lambda x: jax.lax.psum(jax.grad(loss)(w, x), 'i'), axis_name='i')(x)[0]
ref = jax.grad(lambda w: sum(jnp.sum(jnp.sin(conv(xi, w))) for xi in x))(w)
np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_without_a_compiler_the_rules_fall_back_and_say_why(tmp_path, monkeypatch, caplog):
  """No compiler (and nothing cached): one warning with the reason, the rules and
  layers leave the kernels out and compute the same values, and a kernel called
  anyway is a clear error."""
  monkeypatch.setattr(ffi, "_state", {})
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ on it
  monkeypatch.setenv("SILS_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  with caplog.at_level(logging.WARNING):
    assert not ffi.load()
    assert not ffi.load()
    assert cpu_kernels.rules() == WINOGRAD
    lay = cpu_kernels.layers("auto", "cpu")
  assert "no C++ compiler" in ffi.unavailable_reason()
  warnings = [r for r in caplog.records if "Direct-conv CPU kernels unavailable" in r.getMessage()]
  assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
  assert lay["conv"].keywords["rules"] == lay["conv_transpose"].keywords["rules"] == WINOGRAD
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
  layer = lay["conv"](3, (3, 3), use_bias=False)
  params = {"params": {"kernel": w}}
  assert f"{ffi.PREFIX}_" not in str(jax.make_jaxpr(lambda x: layer.apply(params, x))(x))
  np.testing.assert_allclose(layer.apply(params, x), lax_conv(x, w), rtol=1e-5, atol=1e-5)
  with pytest.raises(RuntimeError, match="not loaded: no C\\+\\+ compiler"):
    ffi.conv3x3(x, w)


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setattr(ffi, "_state", {})
  monkeypatch.setenv("SILS_JAX_DIRECT_CONV", "0")
  assert not ffi.load()
  assert ffi.unavailable_reason() == "SILS_JAX_DIRECT_CONV=0"
  assert cpu_kernels.rules() == WINOGRAD


def test_build_is_cached_and_a_compile_error_is_reported(kernels, tmp_path, monkeypatch):
  """The library is found again by its hash without compiling; a source that does not
  compile gives the compiler's message and leaves nothing half-written in the cache."""
  monkeypatch.setenv("SILS_JAX_KERNEL_CACHE", str(tmp_path))
  path = ffi.build()
  mtime = os.path.getmtime(path)
  assert ffi.build() == path and os.path.getmtime(path) == mtime
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(ffi, "SOURCE", str(bad))
  with pytest.raises(RuntimeError, match="failed"):
    ffi.build()
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "bad.cc"])
