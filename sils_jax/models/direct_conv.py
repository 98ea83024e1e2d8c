"""Direct CPU kernels for the model's convolutions, with their gradients, as XLA FFI
calls (``direct_conv.cc``): the decoder's output conv (3x3, 16 -> 3 channels;
``conv3x3``), its 4x4 stride-2 up-convs in their phase form (``up_conv``), and the
encoders' and discriminators' 4x4 stride-2 convs (``strided_conv``; their first ones on
the 3-channel images too).

In XLA's graph these convs move several times the data of the convs themselves: the
output conv a 27-channel product and shifted sum forward and 27-channel patch matrices
backward, each up-conv a 4-window patch matrix, a 4-phase product and the phases'
interleave, each strided conv a space-to-depth copy and a 4-window patch matrix (or
Winograd's transforms), and the transposes of all of them backward. The kernels read
each input window in place and write each output pixel once. At 128x128, batch 8, the
output conv's forward + gradients took 2.6 ms against 11.9 ms in the matrix form, the
decoder's 46 against 68 ms, and the step 0.78 x 0.90 of the time (benchmarks/README.md).
``conv.conv2d`` and ``upsample.phase_conv_transpose`` take them where ``supports``,
``supports_up`` and ``supports_strided`` (and conv's measured rules) say so and the
kernels are ``available``.

The kernels are compiled from the C++ source on first use, once per machine, with the
C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) and ``-O3 -march=native``
(without ``-march`` where the compiler refuses it), into ``$SILS_JAX_KERNEL_CACHE``
(default ``~/.cache/sils_jax/kernels``), named by a hash of the source, the flags,
the jax version, the compiler and the CPU, and reused after (about 10 s once). Where
that fails (no compiler, no FFI headers) or ``SILS_JAX_DIRECT_CONV=0`` is set, one
warning says why and convolutions keep their XLA forms: same values to float
rounding, slower.

The three calls are each other's derivatives (forward ``y = x * w``; input gradient
``dx = dy *^T w``; weight gradient ``dw = x (*) dy``), so every order of gradient
stays in these kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
from absl import logging

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "direct_conv.cc")
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"fwd": "SilsDirectConvFwd", "dx": "SilsDirectConvDx", "dw": "SilsDirectConvDw",
            "up_fwd": "SilsDirectUpConvFwd", "up_dx": "SilsDirectUpConvDx", "up_dw": "SilsDirectUpConvDw",
            "s2_fwd": "SilsDirectS2ConvFwd", "s2_dx": "SilsDirectS2ConvDx", "s2_dw": "SilsDirectS2ConvDw"}
# FFI target names are TARGET_PREFIX + "_" + a key of _TARGETS. The build made here is
# registered as "sils_direct_conv"; benchmarks/ab_step.py --kernels registers another
# build under its own prefix, and a variant that sets this (read at trace time) runs it.
OWN_PREFIX = "sils_direct_conv"
TARGET_PREFIX = OWN_PREFIX
LANES = 16  # input channels per vector in the kernels
MAX_FEATURES = 3
# the up-conv kernels' templates (direct_conv.cc); with 256 -> 128 / 64 channels (the
# first two up-convs, 4x4 and 8x8 inputs at 128 px) the kernels were slower than XLA's
# forms: 5.8 against 4.6 and 8.3 against 6.7 ms forward + gradients at batch 8
UP_IN_CHANNELS = (16, 32, 64, 128)
UP_FEATURES = (16, 32, 64)
# the strided kernels' input channels below one vector (the encoders' and discriminators'
# first convs, on 1-4 channel images: s2_input_grad_small and a partial channel block),
# with these output channels
SMALL_IN_CHANNELS = (1, 2, 3, 4)
SMALL_IN_FEATURES = (16, 32, 64)

_lock = threading.Lock()
_state: dict = {}  # 'ok': bool, 'reason': str, 'path': str


def supports(kernel_shape, strides, padding, dtype) -> bool:
  """Whether the kernels compute this conv: 3x3, stride 1, 'SAME', float32, input
  channels a multiple of 16, 1-3 output channels."""
  kh, kw, cin, cout = kernel_shape
  return ((kh, kw) == (3, 3) and tuple(strides) == (1, 1) and padding == "SAME"
          and cin % LANES == 0 and cin > 0 and 1 <= cout <= MAX_FEATURES
          and jnp.dtype(dtype) == jnp.float32)


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and flags."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f.read().splitlines() if l.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def cache_dir() -> str:
  return os.environ.get("SILS_JAX_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "sils_jax", "kernels")


def _build() -> str:
  """Compiles the kernels (or finds them compiled) and returns the library's path;
  raises RuntimeError with the reason. Where ``-march=native`` is refused (some
  compilers for ARM), builds once more without it."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  include = jax.ffi.include_dir()
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    raise RuntimeError(f"jaxlib has no XLA FFI headers under {include}")
  with open(SOURCE, "rb") as f:
    source = f.read()
  errors = []
  for flags in (CXXFLAGS, tuple(f for f in CXXFLAGS if not f.startswith("-march"))):
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), jax.__version__.encode(),
                                     cxx.encode(), _cpu_id().encode()])).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"direct_conv_{key}.so")
    if os.path.exists(path):
      return path
    os.makedirs(cache_dir(), exist_ok=True)
    # built under a temporary name and renamed, so that processes building at the same
    # time never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    start = time.perf_counter()
    try:
      proc = subprocess.run([cxx, *flags, "-I", include, SOURCE, "-o", tmp], capture_output=True, text=True,
                            timeout=600)
      if proc.returncode == 0:
        os.replace(tmp, path)
        logging.info("Compiled the direct-conv CPU kernels (%s) in %.1f s: %s", " ".join(flags),
                     time.perf_counter() - start, path)
        return path
      errors.append(f"{cxx} {' '.join(flags)} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise RuntimeError("; ".join(errors))


def available() -> bool:
  """Whether the kernels are compiled, loaded and registered with XLA (once per
  process; a failure is logged once, with its reason, and the XLA forms are used)."""
  with _lock:
    if "ok" not in _state:
      if os.environ.get("SILS_JAX_DIRECT_CONV", "1") == "0":
        _state.update(ok=False, reason="SILS_JAX_DIRECT_CONV=0")
      else:
        try:
          path = _build()
          lib = ctypes.CDLL(path)
          register(lib, OWN_PREFIX)
          _state.update(ok=True, reason="", path=path, lib=lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
          _state.update(ok=False, reason=str(e))
          logging.warning("Direct-conv CPU kernels unavailable, using XLA's forms instead: %s", e)
    return _state["ok"]


def register(lib: ctypes.CDLL, prefix: str) -> None:
  """Registers a loaded build's FFI handlers as ``prefix + "_" + name`` for every
  kernel name (the handlers' symbols: ``_TARGETS``)."""
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f"{prefix}_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def unavailable_reason() -> str:
  available()
  return _state["reason"]


def _call(name: str, shape, *args) -> jax.Array:
  if not available():
    raise RuntimeError(f"the direct-conv CPU kernels are unavailable: {unavailable_reason()}")
  # vmap: one call per mapped element (the kernels take one batch of NHWC images)
  return jax.ffi.ffi_call(f"{TARGET_PREFIX}_{name}", jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(*args)


def _bilinear(fwd_name: str, dx_name: str, dw_name: str, out_shape, in_shape):
  """The custom-VJP trio of a bilinear map y = T(x, w) computed by three FFI calls:
  ``apply(x, w)``, its transpose in x ``input_grad(dy, w)`` and in w
  ``weight_grad(x, dy, w_shape)``. Their derivatives are each other:
  <u, input_grad(dy, w)> = <dy, apply(u, w)> = <w, weight_grad(u, dy)> and
  <v, weight_grad(x, dy)> = <x, input_grad(dy, v)> = <dy, apply(x, v)>, so every
  order of gradient stays in the three calls. ``out_shape(x_shape, w_shape)`` and
  ``in_shape(dy_shape, w_shape)`` give the result shapes."""

  @jax.custom_vjp
  def apply(x, w):
    return _call(fwd_name, out_shape(x.shape, w.shape), x, w)

  @jax.custom_vjp
  def input_grad(dy, w):
    return _call(dx_name, in_shape(dy.shape, w.shape), dy, w)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def weight_grad(x, dy, w_shape):
    return _call(dw_name, tuple(w_shape), x, dy)

  apply.defvjp(lambda x, w: (apply(x, w), (x, w)),
               lambda res, dy: (input_grad(dy, res[1]), weight_grad(res[0], dy, res[1].shape)))
  input_grad.defvjp(lambda dy, w: (input_grad(dy, w), (dy, w)),
                    lambda res, u: (apply(u, res[1]), weight_grad(u, res[0], res[1].shape)))
  weight_grad.defvjp(lambda x, dy, w_shape: (weight_grad(x, dy, w_shape), (x, dy)),
                     lambda w_shape, res, v: (input_grad(res[1], v), apply(res[0], v)))
  return apply, input_grad, weight_grad


# y[n, i, j, f] = sum over a, b in {0, 1, 2} and c of x[n, i + a - 1, j + b - 1, c]
# w[a, b, c, f], zero outside the image ('SAME' 3x3, stride 1); its input gradient
# dx[n, i, j, c] = sum over a, b, f of dy[n, i - a + 1, j - b + 1, f] w[a, b, c, f]; its
# weight gradient dw[a, b, c, f] = sum over n, i, j of x[n, i + a - 1, j + b - 1, c] dy[n, i, j, f].
conv3x3, conv3x3_input_grad, conv3x3_weight_grad = _bilinear(
    "fwd", "dx", "dw", lambda xs, ws: xs[:3] + ws[3:], lambda ds, ws: ds[:3] + ws[2:3])


def supports_up(in_channels: int, features: int, dtype) -> bool:
  """Whether the kernels compute this up-conv (``upsample.phase_conv_transpose``)."""
  return (in_channels in UP_IN_CHANNELS and features in UP_FEATURES
          and jnp.dtype(dtype) == jnp.float32)


# The up-convs, ConvTranspose(F, (4, 4), (2, 2), 'SAME') in the phase form
# (sils_jax/models/upsample.py), with k = phase_kernel(kernel) as (2, 2, C, 2, 2, F):
# y[n, 2m + py, 2q + px, f] = sum over a, c in {0, 1} and ch of
# x[n, m + py + a - 1, q + px + c - 1, ch] k[a, c, ch, py, px, f], zero outside the input.
up_conv, up_conv_input_grad, up_conv_weight_grad = _bilinear(
    "up_fwd", "up_dx", "up_dw",
    lambda xs, ks: (xs[0], 2 * xs[1], 2 * xs[2], ks[5]),
    lambda ds, ks: (ds[0], ds[1] // 2, ds[2] // 2, ks[2]))


def supports_strided(x_shape, kernel_shape, strides, padding, dtype) -> bool:
  """Whether the kernels compute this conv: 4x4, stride 2, 'SAME', an even-sized input,
  float32, and input and output channels multiples of 16, or input channels in
  ``SMALL_IN_CHANNELS`` and output channels in ``SMALL_IN_FEATURES`` (the first convs,
  on images)."""
  _, h, w, _ = x_shape
  kh, kw, cin, cout = kernel_shape
  channels = ((cin % LANES == 0 and cout % LANES == 0 and cin > 0 and cout > 0)
              or (cin in SMALL_IN_CHANNELS and cout in SMALL_IN_FEATURES))
  return ((kh, kw) == (4, 4) and tuple(strides) == (2, 2) and padding == "SAME" and h % 2 == 0
          and w % 2 == 0 and h > 0 and w > 0 and channels and jnp.dtype(dtype) == jnp.float32)


# 4x4 stride-2 'SAME' convs of even-sized inputs (the encoders' and discriminators'):
# y[n, oi, oj, f] = sum over a, b in 0..3 and c of x[n, 2 oi + a - 1, 2 oj + b - 1, c]
# w[a, b, c, f], zero outside the input.
strided_conv, strided_conv_input_grad, strided_conv_weight_grad = _bilinear(
    "s2_fwd", "s2_dx", "s2_dw",
    lambda xs, ws: (xs[0], xs[1] // 2, xs[2] // 2, ws[3]),
    lambda ds, ws: (ds[0], 2 * ds[1], 2 * ds[2], ws[2]))
