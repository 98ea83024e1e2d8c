"""The direct CPU kernels of the decoder's output conv and up-convs
(sils_jax/models/direct_conv.py): values and gradients to the second order against
XLA's convolution, which convs take them, determinism, vmap and pmap, the train step,
and the fallback without a compiler."""

import functools
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sils_jax.models import conv, direct_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_kernels = pytest.mark.skipif(not direct_conv.available(),
                                   reason=f"direct-conv kernels unavailable: {direct_conv.unavailable_reason()}")


def test_kernels_build_wherever_a_compiler_is_found():
  """A machine with a C++ compiler and jaxlib's FFI headers must get the kernels, or
  'auto' silently loses them: the build error is the failure message."""
  if direct_conv._compiler() is None:
    pytest.skip("no C++ compiler on this machine")
  assert direct_conv.available(), direct_conv.unavailable_reason()


def _xla(x, w):
  return conv._xla_conv(x, w, (1, 1), ((1, 1), (1, 1)))


# (input shape, output channels): the output conv at 2 sizes, 32 input channels (two
# vectors), one and two outputs, images narrower or shorter than the kernel (every
# pixel on the border)
_CASES = [((2, 6, 6, 16), 3), ((1, 9, 7, 16), 3), ((2, 5, 4, 32), 1), ((1, 1, 1, 16), 2),
          ((3, 2, 9, 16), 3), ((1, 8, 2, 32), 2),
          ((1, 4, 17, 16), 3)]  # the input gradient's 8-, 4-, 2- and 1-pixel blocks of an inner row


@needs_kernels
@pytest.mark.parametrize("shape,cout", _CASES)
def test_direct_conv_equals_xla_conv_to_second_order(shape, cout):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], cout)) * 0.3
  assert direct_conv.supports(w.shape, (1, 1), "SAME", x.dtype)
  # conv2d's own check: values, gradients and the R1-style second-order gradient
  from test_models import _assert_equals_xla_conv_to_second_order
  _assert_equals_xla_conv_to_second_order("direct", x, w, (1, 1), "SAME")
  # and each of the three kernels' own derivatives (the weight gradient's included)
  dy = jax.random.normal(jax.random.key(2), shape[:3] + (cout,))
  pairs = [(lambda x, w: direct_conv.conv3x3(x, w), _xla, (x, w)),
           (lambda dy, w: direct_conv.conv3x3_input_grad(dy, w),
            lambda dy, w: jax.vjp(lambda x: _xla(x, w), x)[1](dy)[0], (dy, w)),
           (lambda x, dy: direct_conv.conv3x3_weight_grad(x, dy, w.shape),
            lambda x, dy: jax.vjp(lambda w: _xla(x, w), w)[1](dy)[0], (x, dy))]
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


@needs_kernels
@pytest.mark.parametrize("shape,features", _UP_CASES)
def test_direct_up_conv_equals_the_transposed_conv_to_second_order(shape, features):
  """The phase form in the kernels against XLA's convolution of the same form and
  flax's ConvTranspose: values, gradients, and the gradient of |dL/dx|^2."""
  import flax.linen as nn
  from sils_jax.models.upsample import phase_conv_transpose
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], features)) * 0.2
  assert direct_conv.supports_up(shape[-1], features, x.dtype)
  out = jax.jit(lambda x, k: phase_conv_transpose(x, k, "direct"))(x, k)
  flax_out = nn.ConvTranspose(features, (4, 4), (2, 2), "SAME", use_bias=False).apply({"params": {"kernel": k}}, x)
  np.testing.assert_allclose(out, flax_out, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(flax_out))))
  from test_models import _assert_equals_xla_conv_to_second_order
  _assert_equals_xla_conv_to_second_order("direct", x, k, None, None, layer=phase_conv_transpose)


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


@needs_kernels
@pytest.mark.parametrize("shape,cout", _STRIDED_CASES + _STRIDED_SMALL_CASES)
def test_direct_strided_conv_equals_xla_conv_to_second_order(shape, cout):
  from test_models import _assert_equals_xla_conv_to_second_order
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (4, 4, shape[-1], cout)) * 0.2
  assert direct_conv.supports_strided(x.shape, w.shape, (2, 2), "SAME", x.dtype)
  _assert_equals_xla_conv_to_second_order("direct", x, w, (2, 2), "SAME")
  text = str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, (2, 2), "SAME", "direct"))(x, w))
  assert "sils_direct_conv_s2_fwd" in text


@needs_kernels
def test_auto_takes_the_kernels_only_for_the_convs_they_support():
  """'auto' on the CPU: the output conv (3x3, 16 -> 3, float32) runs as the FFI call;
  other shapes, strides, paddings and dtypes keep XLA's forms."""
  def runs_direct(shape, kernel, strides="11", padding="SAME", dtype=jnp.float32, impl="auto"):
    s = tuple(int(c) for c in strides)
    f = lambda x, w: conv.conv2d(x, w, s, padding, impl)
    text = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1)))(
        jnp.zeros(shape, dtype), jnp.zeros(kernel, dtype)))
    return "sils_direct_conv_" in text  # any of the kernels
  assert runs_direct((2, 8, 8, 16), (3, 3, 16, 3))
  assert runs_direct((2, 8, 8, 16), (3, 3, 16, 3), impl="direct")
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), impl="winograd")
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), impl="matmul")
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 4))  # 4 outputs
  assert not runs_direct((2, 8, 8, 8), (3, 3, 8, 3))  # 8 input channels
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), strides="22")
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), padding="VALID")
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 3))
  assert not runs_direct((2, 8, 8, 16), (3, 3, 16, 3), dtype=jnp.bfloat16)
  from sils_jax.models.upsample import phase_conv_transpose

  def up_runs_direct(cin, features, dtype=jnp.float32, impl="auto"):
    f = lambda x, k: jnp.sum(phase_conv_transpose(x, k, impl))
    text = str(jax.make_jaxpr(jax.grad(f, (0, 1)))(jnp.zeros((2, 4, 4, cin), dtype),
                                                   jnp.zeros((4, 4, cin, features), dtype)))
    return "sils_direct_conv_up_fwd" in text
  assert up_runs_direct(32, 16) and up_runs_direct(128, 64) and up_runs_direct(16, 16, impl="direct")
  assert not up_runs_direct(32, 16, impl="winograd")
  assert not up_runs_direct(256, 64)  # more input channels than the kernels' templates
  assert not up_runs_direct(32, 8)
  assert not up_runs_direct(32, 16, dtype=jnp.bfloat16)
  # 4x4 stride-2: 16k channels, even sizes, float32; not where Winograd pays over fewer
  # than DIRECT_OVER_WINOGRAD_POSITIONS positions
  assert runs_direct((2, 8, 8, 16), (4, 4, 16, 32), strides="22")
  assert runs_direct((2, 8, 8, 3), (4, 4, 3, 16), strides="22")  # the first convs
  assert runs_direct((2, 8, 8, 1), (4, 4, 1, 64), strides="22")
  assert not runs_direct((2, 8, 8, 3), (4, 4, 3, 48), strides="22")  # F of 16, 32, 64 only there
  assert not runs_direct((2, 8, 8, 5), (4, 4, 5, 16), strides="22")
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 8), strides="22")
  assert not runs_direct((2, 9, 9, 16), (4, 4, 16, 32), strides="22")  # odd size
  assert not runs_direct((2, 8, 8, 16), (4, 4, 16, 32), strides="22", dtype=jnp.bfloat16)
  assert conv.DIRECT_OVER_WINOGRAD_POSITIONS == 8192
  for impl in ("auto", "direct"):  # Winograd's at 2048 positions, the kernels' from 8192
    assert not runs_direct((2, 64, 64, 32), (4, 4, 32, 64), strides="22", impl=impl)
    assert runs_direct((8, 64, 64, 32), (4, 4, 32, 64), strides="22", impl=impl)
  # the decoder's output conv and its last three up-convs in the model (128 -> 64 and
  # 256 -> 128 channels stay in XLA's forms)
  from sils_jax.models.unet import Decoder, Encoder
  x = jnp.zeros((1, 32, 32, 3))
  feats = Encoder().init_with_output(jax.random.key(0), x, train=False)[0]
  dec = Decoder(upsample="phases")
  v = dec.init(jax.random.key(1), feats, train=False)
  text = str(jax.make_jaxpr(lambda f: dec.apply(v, f, train=False))(feats))
  assert text.count("sils_direct_conv_fwd") == 1 and text.count("sils_direct_conv_up_fwd") == 3
  # every encoder conv at batch 1, the first (3 input channels) included
  enc = Encoder()
  ev = enc.init(jax.random.key(2), x, train=False)
  assert str(jax.make_jaxpr(lambda x: enc.apply(ev, x, train=False))(x)).count("sils_direct_conv_s2_fwd") == 5


@needs_kernels
def test_direct_conv_is_deterministic():
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
  same_bits_every_call(direct_conv.conv3x3, direct_conv.conv3x3_input_grad, direct_conv.conv3x3_weight_grad,
                       x, normal(2, (3, 3, 16, 3)), normal(1, (4, 64, 64, 3)))
  same_bits_every_call(direct_conv.up_conv, direct_conv.up_conv_input_grad, direct_conv.up_conv_weight_grad,
                       x, normal(3, (2, 2, 16, 2, 2, 16)), normal(4, (4, 128, 128, 16)))
  # the strided conv on a 3-channel image: each thread's buffer of the input gradient
  same_bits_every_call(direct_conv.strided_conv, direct_conv.strided_conv_input_grad,
                       direct_conv.strided_conv_weight_grad,
                       normal(5, (4, 96, 64, 3)), normal(6, (4, 4, 3, 32)), normal(7, (4, 48, 32, 32)))


@needs_kernels
def test_weight_gradients_over_many_rows():
  """More rows than 16 chunks of 8: the weight-gradient kernels take more rows per chunk
  (their partials stay at 16 kernel-sized buffers) and still sum every row once."""
  x = jax.random.normal(jax.random.key(0), (8, 160, 6, 16))  # 640 output rows for the strided conv
  dy = jax.random.normal(jax.random.key(1), (8, 80, 3, 16))
  got = direct_conv.strided_conv_weight_grad(x, dy, (4, 4, 16, 16))
  want = jax.vjp(lambda w: conv._xla_conv(x, w, (2, 2), ((1, 1), (1, 1))), jnp.zeros((4, 4, 16, 16)))[1](dy)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  xu = jax.random.normal(jax.random.key(2), (8, 80, 3, 16))  # 640 input rows for the up-conv
  dz = jax.random.normal(jax.random.key(3), (8, 160, 6, 16))
  k = jnp.zeros((2, 2, 16, 2, 2, 16))
  got = direct_conv.up_conv_weight_grad(xu, dz, k.shape)
  from sils_jax.models.upsample import phase_conv_transpose
  ref = lambda k6: phase_conv_transpose(xu, _kernel_from_phases(k6), "xla")
  want = jax.vjp(ref, k)[1](dz)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def _kernel_from_phases(k6):
  """The inverse of upsample.phase_kernel (a permutation of the taps), for the phase
  layout (2, 2, C, 2, 2, F): tap 2a + p of each axis is window offset a of phase p."""
  c, f = k6.shape[2], k6.shape[5]
  return jnp.transpose(k6, (0, 3, 1, 4, 2, 5)).reshape(4, 4, c, f)


@needs_kernels
def test_direct_conv_under_vmap_and_with_many_devices():
  x = jax.random.normal(jax.random.key(0), (3, 2, 5, 6, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
  got = jax.vmap(lambda x: direct_conv.conv3x3(x, w))(x)
  np.testing.assert_allclose(got, jax.vmap(lambda x: _xla(x, w))(x), rtol=1e-5, atol=1e-5)
  # pmap over 8 fake CPU devices (a subprocess: the device count is fixed at start-up)
  code = """
import jax, jax.numpy as jnp, numpy as np
from sils_jax.models import direct_conv, conv
assert jax.device_count() == 8 and direct_conv.available()
x = jax.random.normal(jax.random.key(0), (8, 2, 16, 16, 16))
w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
loss = lambda w, x: jnp.sum(jnp.sin(direct_conv.conv3x3(x, w)))
g = jax.pmap(lambda x: jax.lax.psum(jax.grad(loss)(w, x), 'i'), axis_name='i')(x)[0]
ref = jax.grad(lambda w: sum(jnp.sum(jnp.sin(conv._xla_conv(xi, w, (1, 1), ((1, 1), (1, 1))))) for xi in x))(w)
np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@needs_kernels
def test_train_step_with_direct_conv_matches_the_xla_forms():
  """One train step of a model with 16k channels, whose every conv, the 3-channel first
  ones included, but the discriminators' 1x1 logits runs in the kernels ('direct',
  the R1 penalty's second order included), against XLA's matrix forms ('winograd'):
  the same losses and updated parameters to float rounding."""
  from test_train import _one_step
  from tiny_config import tiny_config
  runs = {}
  for impl in ("winograd", "direct"):
    c = tiny_config()
    c.encoder_features = (16, 16, 16, 16, 16)
    c.decoder_features = (16, 16, 16, 16, 16)
    c.disc_features = (16, 16, 16, 16)
    c.conv_impl = impl
    runs[impl] = _one_step(c)
  a, b = runs["winograd"], runs["direct"]
  for k in a[4]:
    assert b[4][k] == pytest.approx(a[4][k], rel=1e-4, abs=1e-6), k
  for x, y in zip(jax.tree.leaves(a[2].params), jax.tree.leaves(b[2].params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


def test_without_a_compiler_auto_falls_back_and_direct_says_why(tmp_path, monkeypatch, caplog):
  """No compiler (and nothing cached): one warning with the reason, 'auto' runs XLA's
  forms with the same values, and an explicit conv_impl='direct' is a clear error."""
  monkeypatch.setattr(direct_conv, "_state", {})
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ on it
  monkeypatch.setenv("SILS_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 3))
  with caplog.at_level(logging.WARNING):
    out = conv.conv2d(x, w, (1, 1), "SAME", "auto")
    conv.conv2d(x, w, (1, 1), "SAME", "auto")
  assert not direct_conv.available()
  assert "no C++ compiler" in direct_conv.unavailable_reason()
  warnings = [r for r in caplog.records if "Direct-conv CPU kernels unavailable" in r.getMessage()]
  assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
  assert "sils_direct_conv" not in str(jax.make_jaxpr(lambda x: conv.conv2d(x, w, (1, 1), "SAME", "auto"))(x))
  np.testing.assert_allclose(out, _xla(x, w), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="conv_impl='direct'.*no C\\+\\+ compiler"):
    conv.conv2d(x, w, (1, 1), "SAME", "direct")
  # and the CLI's config check says so before anything is built
  from sils_jax.training import config_checks
  from tiny_config import tiny_config
  c = tiny_config()
  c.conv_impl = "direct"
  with pytest.raises(config_checks.ConfigError, match="config.conv_impl: expected 'direct' only where.*no C\\+\\+ compiler"):
    config_checks.validate(c)
  # shapes the kernels do not take never need them, even with 'direct'
  conv.conv2d(x[..., :8], w[:, :, :8], (1, 1), "SAME", "direct")


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setattr(direct_conv, "_state", {})
  monkeypatch.setenv("SILS_JAX_DIRECT_CONV", "0")
  assert not direct_conv.available()
  assert direct_conv.unavailable_reason() == "SILS_JAX_DIRECT_CONV=0"


@needs_kernels
def test_build_is_cached_and_a_compile_error_is_reported(tmp_path, monkeypatch):
  """The library is found again by its hash without compiling; a source that does not
  compile gives the compiler's message and leaves nothing half-written in the cache."""
  monkeypatch.setenv("SILS_JAX_KERNEL_CACHE", str(tmp_path))
  path = direct_conv._build()
  mtime = os.path.getmtime(path)
  assert direct_conv._build() == path and os.path.getmtime(path) == mtime
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(direct_conv, "SOURCE", str(bad))
  with pytest.raises(RuntimeError, match="failed"):
    direct_conv._build()
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "bad.cc"])
