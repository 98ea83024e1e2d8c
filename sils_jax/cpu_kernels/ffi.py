"""Direct CPU kernels (C++ through XLA's FFI, ``direct_conv.cc``) for the model's
convolutions and their gradients: the decoder's output conv (3x3, 16k -> 1-3 channels;
``conv3x3``), its 4x4 stride-2 up-convs in the phase form (``up_conv``) and the 4x4
stride-2 convs of the encoders and discriminators (``strided_conv``).

Why: in XLA's graph these convs are patch matrices, shifted sums and interleaves that
move several times the data of the products; the kernels read each input window in
place and write each output pixel once (gains: benchmarks/README.md).

``load()`` compiles the source once per machine with the C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``; ``-O3 -march=native``, without ``-march`` where refused)
into ``$SILS_JAX_KERNEL_CACHE`` (default ``~/.cache/sils_jax/kernels``), named by a hash
of source, flags, jax version, compiler and CPU, then registers the FFI targets. It is
called once, before anything is traced (``cpu_kernels.layers``); compiler warnings are
logged. The three calls of each kernel are each other's derivatives, so every order of
gradient stays in them.
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
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"fwd": "SilsDirectConvFwd", "dx": "SilsDirectConvDx", "dw": "SilsDirectConvDw",
            "up_fwd": "SilsDirectUpConvFwd", "up_dx": "SilsDirectUpConvDx", "up_dw": "SilsDirectUpConvDw",
            "s2_fwd": "SilsDirectS2ConvFwd", "s2_dx": "SilsDirectS2ConvDx", "s2_dw": "SilsDirectS2ConvDw"}
PREFIX = "sils_direct_conv"  # FFI target names: PREFIX + "_" + a key of _TARGETS
LANES = 16  # input channels per vector in the kernels
MAX_FEATURES = 3
# the up-conv kernels' templates (direct_conv.cc); the 256-channel up-convs stay in
# XLA's forms, where the kernels measured slower
UP_IN_CHANNELS = (16, 32, 64, 128)
UP_FEATURES = (16, 32, 64)
# the strided kernels' input channels below one vector (the first convs, on 1-4
# channel images), with these output channels
SMALL_IN_CHANNELS = (1, 2, 3, 4)
SMALL_IN_FEATURES = (16, 32, 64)

_lock = threading.Lock()
_state: dict = {}  # 'ok': bool, 'reason': str, 'path': str, 'lib': CDLL


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


def build() -> str:
  """Compiles the kernels (or finds them compiled) and returns the library's path;
  raises RuntimeError with the reason. Compiler warnings are logged."""
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
    # built under a temporary name and renamed: processes building at the same time
    # never load a half-written file
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
        if proc.stderr.strip():
          logging.warning("Compiler warnings for %s:\n%s", SOURCE, proc.stderr.strip()[-4000:])
        return path
      errors.append(f"{cxx} {' '.join(flags)} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise RuntimeError("; ".join(errors))


def load() -> bool:
  """Builds, loads and registers the kernels once per process; returns whether they
  are usable. ``SILS_JAX_DIRECT_CONV=0`` turns them off. A failure is logged once
  with its reason (``unavailable_reason``)."""
  with _lock:
    if "ok" not in _state:
      if os.environ.get("SILS_JAX_DIRECT_CONV", "1") == "0":
        _state.update(ok=False, reason="SILS_JAX_DIRECT_CONV=0")
      else:
        try:
          path = build()
          lib = ctypes.CDLL(path)
          for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"{PREFIX}_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
          _state.update(ok=True, reason="", path=path, lib=lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
          _state.update(ok=False, reason=str(e))
          logging.warning("Direct-conv CPU kernels unavailable, using XLA's forms instead: %s", e)
    return _state["ok"]


def unavailable_reason() -> str:
  return _state.get("reason", "not loaded (call cpu_kernels.ffi.load() before tracing)")


def _call(name: str, shape, *args) -> jax.Array:
  if not _state.get("ok"):
    raise RuntimeError(f"the direct-conv CPU kernels are not loaded: {unavailable_reason()}")
  # vmap: one call per mapped element (the kernels take one batch of NHWC images)
  return jax.ffi.ffi_call(f"{PREFIX}_{name}", jax.ShapeDtypeStruct(shape, jnp.float32),
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
  """Whether the kernels compute this up-conv (``upconv.phase_conv_transpose``)."""
  return (in_channels in UP_IN_CHANNELS and features in UP_FEATURES
          and jnp.dtype(dtype) == jnp.float32)


# The up-convs, ConvTranspose(F, (4, 4), (2, 2), 'SAME') in the phase form
# (upconv.py), with k = phase_kernel(kernel) as (2, 2, C, 2, 2, F):
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
