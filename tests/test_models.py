"""Architecture checks: shapes, the sub-pixel up-conv identity, discriminator branches.

Random keys use the RBG generator, as the package does for initialisation: XLA:CPU
compiles threefry-based inits several times slower.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sils_jax.models.discriminator import Discriminator, LayerDiscriminators, downsample
from sils_jax.models.separator import LayerSeparator
from sils_jax.models.unet import Encoder
from sils_jax.models.upsample import SubpixelConvTranspose, upsample_conv


@pytest.mark.parametrize("form", ["subpixel", "phases"])
@pytest.mark.parametrize("conv_impl", ["xla", "matmul"])
@pytest.mark.parametrize("shape,features", [((2, 5, 7, 3), 4), ((1, 8, 8, 16), 8), ((3, 1, 2, 2), 1)])
def test_upsample_forms_equal_conv_transpose(form, conv_impl, shape, features):
  module = functools.partial(SubpixelConvTranspose, form=form, conv_impl=conv_impl)
  x = jax.random.normal(jax.random.key(0, impl="rbg"), shape)
  ref = nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME")
  params = ref.init(jax.random.key(1, impl="rbg"), x)
  # non-zero bias too, so the bias layout is checked
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2, impl="rbg"), a.shape), params)
  want = ref.apply(params, x)
  got = module(features).apply(params, x)
  assert got.shape == want.shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # and the gradients w.r.t. the shared kernel agree
  g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
  g_sub = jax.grad(lambda p: jnp.sum(module(features).apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_sub)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["subpixel", "phases"])
def test_upsample_kernel_mapping_has_no_gather_or_scatter(form):
  # The 4x4 kernel's mapping to the conv layout is static: indexing it with a tap
  # table lowers to a gather, whose gradient is a scatter-add into a fresh zero
  # buffer of the kernel's size every step (12% of the CPU step at batch 1,
  # benchmarks/README.md). Checked on the lowered gradient, before XLA's passes.
  module = SubpixelConvTranspose(8, form=form, conv_impl="matmul")
  x = jnp.ones((1, 4, 4, 16))
  params = module.init(jax.random.key(0, impl="rbg"), x)
  text = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))).lower(params).as_text()
  assert "gather" not in text and "scatter" not in text


def test_upsample_auto_is_phases_on_cpu_and_keeps_parameters():
  x = jax.random.normal(jax.random.key(0, impl="rbg"), (2, 4, 6, 5))
  auto, sub = upsample_conv(3, "auto"), upsample_conv(3, "subpixel")
  params = sub.init(jax.random.key(1, impl="rbg"), x)
  assert jax.tree.map(jnp.shape, auto.init(jax.random.key(1, impl="rbg"), x)) == jax.tree.map(jnp.shape, params)
  assert jax.default_backend() == "cpu" and auto.form == "phases"
  np.testing.assert_allclose(auto.apply(params, x), sub.apply(params, x), atol=1e-5, rtol=1e-5)


def test_upsample_conv_rejects_unknown_impl():
  with pytest.raises(ValueError, match="config.upsample"):
    upsample_conv(4, "bilinear")


def test_encoder_levels_and_latent_shape():
  enc = Encoder(features=(16, 32, 64, 128, 256))
  x = jnp.zeros((2, 64, 64, 3))
  v = enc.init(jax.random.key(0, impl="rbg"), x, train=False)
  feats = enc.apply(v, x, train=False)
  assert [f.shape for f in feats] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128),
                                      (2, 2, 2, 256)]


@pytest.mark.parametrize("num_layers", [2, 3])
def test_separator_streams_are_unshared_and_callable_separately(num_layers):
  m = LayerSeparator(num_layers=num_layers, encoder_features=(4, 8, 8, 8, 8), decoder_features=(8, 8, 8, 4, 4))
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (2, 32, 32, 3))
  v = m.init(jax.random.key(1, impl="rbg"), x, train=False)
  assert sorted(v["params"]) == sorted([f"E{k}" for k in range(num_layers)] + [f"G{k}" for k in range(num_layers)])
  k0 = v["params"]["E0"]["conv0"]["kernel"]
  k1 = v["params"]["E1"]["conv0"]["kernel"]
  assert not np.allclose(k0, k1)  # same structure, separate parameters
  layers = m.apply(v, x)
  assert layers.shape == (2, num_layers, 32, 32, 3)
  codes = m.apply(v, x, train=False, method="encode")
  assert len(codes) == num_layers and codes[0][-1].shape == (2, 1, 1, 8)
  decoded = m.apply(v, codes, train=False, method="decode")
  np.testing.assert_allclose(decoded, layers, atol=1e-6)
  per_layer = m.apply(v, jnp.stack([x] * num_layers, axis=1), train=False, method="encode_layers")
  for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(codes)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batchnorm_in_training_normalises_each_batch():
  m = LayerSeparator(num_layers=2, encoder_features=(4, 4, 4, 4, 4), decoder_features=(4, 4, 4, 4, 4))
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (4, 32, 32, 3))
  v = m.init(jax.random.key(1, impl="rbg"), x, train=False)
  (codes, _), upd = m.apply(v, x, train=True, method="separate", mutable=["batch_stats"])
  assert "batch_stats" in upd
  # BN output (before leaky ReLU) has zero mean per channel; after leaky ReLU the
  # negative half shrinks, so the mean is >= 0 and the features are not constant.
  f = codes[0][0]
  assert f.std() > 0.1


def test_downsample_is_unit_avgpool_without_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  y = downsample(x)
  assert y.shape == (1, 2, 2, 1)
  # corner window covers rows/cols {0,1} only (padding not counted)
  assert float(y[0, 0, 0, 0]) == pytest.approx(np.mean([0, 1, 4, 5]))
  # interior window (rows 1..3, cols 1..3)
  assert float(y[0, 1, 1, 0]) == pytest.approx(np.mean([5, 6, 7, 9, 10, 11, 13, 14, 15]))


@pytest.mark.parametrize("branches", [1, 3])
def test_discriminator_branches(branches):
  d = LayerDiscriminators(num_layers=2, num_branches=branches)
  layers = jnp.zeros((2, 2, 64, 64, 3))
  v = d.init(jax.random.key(0, impl="rbg"), layers)
  out = d.apply(v, layers)
  assert len(out) == 2 and all(len(o) == branches for o in out)
  assert [o.shape for o in out[0]] == [(2, 4 // 2 ** b, 4 // 2 ** b, 1) for b in range(branches)]
  # the two layers' discriminators have separate parameters
  assert not np.allclose(v["params"]["d0"]["branch0_conv0"]["kernel"], v["params"]["d1"]["branch0_conv0"]["kernel"])
  with pytest.raises(ValueError, match="expected layers of shape"):
    d.apply(v, jnp.zeros((2, 3, 64, 64, 3)))


def test_discriminator_init_is_small_normal():
  v = Discriminator().init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
  k = np.asarray(v["params"]["branch0_conv1"]["kernel"])
  assert 0.015 < k.std() < 0.025  # N(0, 0.02), as UNIT


@pytest.mark.parametrize("shape,kernel,strides", [
    ((2, 8, 8, 3), (4, 4), (2, 2)),   # encoder / discriminator conv
    ((1, 5, 7, 4), (4, 4), (2, 2)),   # odd sizes: asymmetric SAME padding
    ((2, 6, 6, 5), (3, 3), (1, 1)),   # sub-pixel up-conv, output conv
    ((1, 4, 4, 6), (1, 1), (1, 1)),   # discriminator logits
])
def test_matmul_conv_equals_xla_conv_values_and_gradients(shape, kernel, strides):
  from sils_jax.models.conv import conv2d
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, kernel + (shape[-1], 7)) * 0.3

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, strides, "SAME", impl)))
  # 'xla_pad' zero-pads the input channels (3, 5, 6 here) to a multiple of 4: the
  # gradients come back in the unpadded shapes
  for impl in ("matmul", "xla_pad"):
    np.testing.assert_allclose(conv2d(x, w, strides, "SAME", impl),
                               conv2d(x, w, strides, "SAME", "xla"), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(loss(impl), (0, 1))(x, w), jax.grad(loss("xla"), (0, 1))(x, w)):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_padded_conv_pads_16_bit_inputs_to_eight_channels():
  from sils_jax.models.conv import conv2d
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 3)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (4, 4, 3, 5)) * 0.3).astype(jnp.bfloat16)
  hlo = jax.jit(lambda x, w: conv2d(x, w, (2, 2), "SAME", "xla_pad")).lower(x, w).as_text()
  assert "tensor<1x6x6x8xbf16>" in hlo  # the input, padded to 8 channels
  hlo32 = jax.jit(lambda x, w: conv2d(x, w, (2, 2), "SAME", "xla_pad")).lower(
      x.astype(jnp.float32), w.astype(jnp.float32)).as_text()
  assert "tensor<1x6x6x4xf32>" in hlo32 and "tensor<1x6x6x8xf32>" not in hlo32
  np.testing.assert_array_equal(conv2d(x, w, (2, 2), "SAME", "xla_pad"), conv2d(x, w, (2, 2), "SAME", "xla"))


def test_conv_impl_does_not_change_the_model():
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  impls = ("matmul", "auto", "xla_pad", "winograd", "direct")
  from sils_jax.models import direct_conv
  if not direct_conv.available():
    impls = impls[:-1]
  models = {impl: LayerSeparator(num_layers=2, conv_impl=impl) for impl in ("xla",) + impls}
  variables = models["xla"].init(jax.random.key(0), x)
  for impl in impls:  # the same parameter tree works for every impl
    assert jax.tree.structure(models[impl].init(jax.random.key(0), x)) == jax.tree.structure(variables)
  ref = models["xla"].apply(variables, x, train=True, mutable=["batch_stats"])[0]
  for impl in impls:
    out = models[impl].apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  d = {impl: LayerDiscriminators(num_layers=2, num_branches=2, conv_impl=impl) for impl in ("xla", "matmul")}
  layers = jnp.stack([x, x[::-1]], axis=1)
  dv = d["xla"].init(jax.random.key(2), layers)
  for a, b in zip(jax.tree.leaves(d["xla"].apply(dv, layers)), jax.tree.leaves(d["matmul"].apply(dv, layers))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_conv_impl_rejects_unknown_name():
  from sils_jax.models.conv import conv2d
  with pytest.raises(ValueError, match="conv_impl"):
    conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="fast")


# (input shape, kernel, strides, padding, output channels): every form of the matrix
# conv's custom gradient (odd sizes: test_matmul_conv_equals_xla_conv_values_and_
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


def _assert_equals_xla_conv_to_second_order(impl, x, w, strides, padding, layer=None):
  """Values, gradients and the R1-style second-order gradient (of |dL/dx|^2 with
  respect to both inputs) of conv2d(impl), jitted, against XLA's convolution; or of
  ``layer(x, w, impl)`` against ``layer(x, w, 'xla')`` where given."""
  from sils_jax.models import conv
  if layer is None:
    layer = lambda x, w, impl: conv.conv2d(x, w, strides, padding, impl)

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(layer(x, w, impl)))

  def r1(impl):
    return lambda w, x: jnp.sum(jax.grad(loss(impl))(x, w) ** 2)

  out = layer(x, w, impl)
  np.testing.assert_allclose(out, layer(x, w, "xla"), rtol=1e-5, atol=1e-5)
  for fn, args in ((loss, (x, w)), (r1, (w, x))):
    got = jax.jit(jax.grad(fn(impl), (0, 1)))(*args)
    want = jax.grad(fn("xla"), (0, 1))(*args)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  return out


def test_matrix_conv_forms_equal_xla_conv_to_second_order():
  """Every matrix form against XLA's convolution to the second order; and the cases
  cover every (forward form, input-gradient form) pair."""
  from sils_jax.models import conv
  seen = set()
  for shape, kernel, strides, padding, cout in _WINDOW_CASES:
    kx, kw = jax.random.split(jax.random.key(len(seen)))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, kernel + (shape[-1], cout)) * 0.3
    out = _assert_equals_xla_conv_to_second_order("matmul", x, w, strides, padding)
    s = strides[0]
    ka = kernel[0] // s
    kmat = jnp.zeros((ka * ka * s * s * shape[-1], cout))  # the blocked frame's kernel matrix
    seen.add((conv._narrows(kmat, ka, ka), conv._correlates(out.shape, kmat, ka, ka)))
  assert seen == {(True, True), (True, False), (False, False)}  # widening never correlates


def test_matrix_conv_shift_form_keeps_16_bit_inputs_accurate_and_typed():
  """The narrowing form adds its taps' partial sums in float32 and rounds once: the
  bfloat16 result is as close to the float32 conv as one bfloat16 rounding."""
  from sils_jax.models import conv
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3)) * 0.3
  assert conv._narrows(w.reshape(9 * 16, 3), 3, 3)
  want = conv.conv2d(x, w, (1, 1), "SAME", "xla")
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  got = jax.jit(lambda x, w: conv.conv2d(x, w, (1, 1), "SAME", "matmul"))(x16, w16)
  assert got.dtype == jnp.bfloat16
  ref16 = conv.conv2d(x16.astype(jnp.float32), w16.astype(jnp.float32), (1, 1), "SAME", "xla")
  # inputs rounded to bfloat16 give ref16; the output's own rounding is 2^-8 relative
  np.testing.assert_allclose(got.astype(jnp.float32), ref16, rtol=2 ** -8, atol=1e-2)
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.1


# (input shape, output channels): 4x4 stride-2 convs that conv_impl='winograd' (and
# 'auto' on CPU) runs as Winograd's F(2x2, 2x2) once they have enough positions
# (``conv._winograd_pays``; the threshold is lowered here to keep the test small):
# even and odd sizes (SAME padding, an odd tile count cropped after).
_WINOGRAD_CASES = [((4, 16, 16, 16), 32), ((1, 33, 31, 16), 20)]


@pytest.mark.parametrize("shape,cout", _WINOGRAD_CASES)
def test_winograd_conv_equals_xla_conv_to_second_order(shape, cout, monkeypatch):
  from sils_jax.models import conv
  monkeypatch.setattr(conv, "WINOGRAD_MIN_POSITIONS", 1)
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], cout)) * 0.1
  b, h, wd, _ = shape
  assert conv._winograd_pays(w.shape, (2, 2), b * -(-h // 2) * -(-wd // 2), x.dtype)
  _assert_equals_xla_conv_to_second_order("winograd", x, w, (2, 2), "SAME")


@pytest.mark.parametrize("shape,kernel,strides,cout", [
    ((2, 6, 6, 16), (3, 3), (1, 1), 3),  # the decoder's output conv: shift-form forward
    ((1, 5, 7, 2), (3, 3), (1, 1), 4),   # widening: patch-matrix forward, odd sizes
    ((1, 6, 6, 3), (4, 4), (2, 2), 2),   # strided: XLA's convolution
])
def test_thin_conv_equals_xla_conv_to_second_order(shape, kernel, strides, cout, monkeypatch):
  """'auto' (CPU) runs a stride-1 conv to few channels over many positions (the output
  conv at batch 8, 128x128) with the matrix form's forward and XLA's gradients (the
  position threshold is lowered here to keep the test small), unless glibc keeps
  freed memory: then all of it in the matrix form. (Where the direct-conv kernels
  built, 'auto' runs the output conv with them instead: switched off here.)"""
  from sils_jax import cpu_memory
  from sils_jax.models import conv
  monkeypatch.setattr(conv.direct_conv, "available", lambda: False)
  monkeypatch.setattr(conv, "MATMUL_MAX_THIN_POSITIONS", 0)
  monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
  monkeypatch.setattr(cpu_memory, "_KEPT", True)
  assert conv.resolve_impl("auto", 1, cout) == "winograd"
  monkeypatch.setattr(cpu_memory, "_KEPT", False)
  assert conv.resolve_impl("auto", 1, cout) == "thin"
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), kernel + (shape[-1], cout)) * 0.3
  _assert_equals_xla_conv_to_second_order("auto", x, w, strides, "SAME")
  f = lambda x, w: conv.conv2d(x, w, strides, "SAME", "auto")
  forward = str(jax.make_jaxpr(f)(x, w))
  gradient = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1)))(x, w))
  xla_forward = strides != (1, 1)
  assert ("conv_general_dilated" in forward) == xla_forward
  assert ("dot_general" in forward) == (not xla_forward)
  assert "conv_general_dilated" in gradient


@pytest.mark.parametrize("shape", [(2, 9, 7, 4), (1, 8, 8, 5), (1, 2, 3, 2)])
def test_winograd_2x2_equals_the_valid_conv_and_its_transforms_are_adjoint(shape):
  from sils_jax.models import conv
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (2, 2, shape[-1], 6))
  np.testing.assert_allclose(conv.winograd_2x2(x, k), conv.conv2d(x, k, (1, 1), "VALID", "xla"),
                             rtol=1e-5, atol=1e-5)
  # the hand-written transposes: <tile(x), u> == <x, untile(u)> for every axis
  xo = jnp.pad(x, ((0, 0), (0, 1 - shape[1] % 2), (0, 1 - shape[2] % 2), (0, 0)))  # odd sizes
  for axis in (1, 2):
    t = conv._tile3(xo, axis)
    u = jax.random.normal(jax.random.key(2), t.shape)
    np.testing.assert_allclose(jnp.vdot(t, u), jnp.vdot(xo, conv._untile3(u, axis)), rtol=1e-5)


def _linear_pairs():
  """(name, f, its hand-written transpose, static arguments, input shape): the linear
  maps of the conv forms whose gradients are written out, each the other's custom VJP."""
  from sils_jax.models import conv, upsample
  return [
      ("patches", conv._patches, conv._col2im, (2, 2, 2), (2, 6, 5, 6)),
      ("patches 3x3", conv._patches, conv._col2im, (3, 3, 1), (1, 7, 8, 3)),
      ("shifted sum", conv._shifted_sum, conv._shifted_stack, (2, 3), (2, 5, 6, 6, 4)),
      ("phases", upsample.interleave_phases, upsample.scatter_phases, (), (2, 4, 6, 2, 2, 3)),
      ("tile3 rows", conv._tile3, conv._untile3, (1,), (2, 7, 4, 3)),
      ("tile3 columns", conv._tile3, conv._untile3, (2,), (2, 4, 5, 3)),
      ("untile2 rows", conv._untile2, conv._tile2, (1,), (3, 2, 3, 4, 5)),
      ("untile2 columns", conv._untile2, conv._tile2, (2,), (3, 2, 3, 4, 5)),
  ]


@pytest.mark.parametrize("case", range(8))
def test_hand_written_transposes_are_adjoint_and_equal_autodiff(case):
  """<f(x), y> == <x, f^T(y)>, and f's gradient (f^T, and f^T's gradient f) is what
  autodiff of the plain function gives, so every order of the conv's gradients is
  exact (the R1 penalty differentiates input gradients again)."""
  name, f, ft, static, shape = _linear_pairs()[case]
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
  conv_impl='auto' takes it on the CPU."""
  from sils_jax.models import conv
  x = jnp.ones((2, 64, 64, 32))  # 2048 output positions: 'auto' keeps Winograd (not the direct kernels)
  w = jnp.ones((4, 4, 32, 64))

  def flops(impl):
    cost = jax.jit(lambda x, w: conv.conv2d(x, w, (2, 2), "SAME", impl)).lower(x, w).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]
  direct = 2 * 2 * 32 * 32 * 16 * 32 * 64  # the conv's multiply-adds, x2
  assert flops("matmul") >= 0.99 * direct
  assert flops("winograd") < 0.6 * direct
  assert flops("auto") == flops("winograd")
  # 16-bit inputs keep the matrix form (the transforms' sums would round in bfloat16)
  assert not conv._winograd_pays(w.shape, (2, 2), 2 * 32 * 32, jnp.bfloat16)
