"""A direct CPU kernel for the decoder's output conv (3x3, 16 -> 3 channels), with its
gradients, as XLA FFI calls (``direct_conv.cc``).

In XLA's graph that conv moves about 5x the data of the conv itself (a 27-channel
product and shifted sum forward, 27-channel patch matrices backward); at 128x128,
batch 8 its forward + gradients took 11.9 ms in the matrix form against 2.6 ms here
(benchmarks/README.md). ``conv.conv2d`` takes this form where ``supports`` says so
and the kernels are ``available``.

The kernels are compiled from the C++ source on first use, once per machine, with the
C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) and ``-O3 -march=native``,
into ``$SILS_JAX_KERNEL_CACHE`` (default ``~/.cache/sils_jax/kernels``), named by a
hash of the source, the flags, the jax version and the CPU, and reused after. Where
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
_TARGETS = {"fwd": "SilsDirectConvFwd", "dx": "SilsDirectConvDx", "dw": "SilsDirectConvDw"}
LANES = 16  # input channels per vector in the kernels
MAX_FEATURES = 3

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
  raises RuntimeError with the reason."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
  include = jax.ffi.include_dir()
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    raise RuntimeError(f"jaxlib has no XLA FFI headers under {include}")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, " ".join(CXXFLAGS).encode(), jax.__version__.encode(),
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
    proc = subprocess.run([cxx, *CXXFLAGS, "-I", include, SOURCE, "-o", tmp],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"{cxx} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info("Compiled the direct-conv CPU kernels in %.1f s: %s", time.perf_counter() - start, path)
  return path


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
          for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"sils_direct_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
          _state.update(ok=True, reason="", path=path, lib=lib)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
          _state.update(ok=False, reason=str(e))
          logging.warning("Direct-conv CPU kernels unavailable, using XLA's forms instead: %s", e)
    return _state["ok"]


def unavailable_reason() -> str:
  available()
  return _state["reason"]


def _call(name: str, shape, *args) -> jax.Array:
  # vmap: one call per mapped element (the kernels take one batch of NHWC images)
  return jax.ffi.ffi_call(f"sils_direct_conv_{name}", jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(*args)


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """y[n, i, j, f] = sum over a, b in {0, 1, 2} and c of x[n, i + a - 1, j + b - 1, c]
  w[a, b, c, f], zero outside the image ('SAME' 3x3, stride 1)."""
  return _call("fwd", x.shape[:3] + w.shape[3:], x, w)


@jax.custom_vjp
def conv3x3_input_grad(dy: jax.Array, w: jax.Array) -> jax.Array:
  """The transpose of ``conv3x3`` in x: dx[n, i, j, c] = sum over a, b, f of
  dy[n, i - a + 1, j - b + 1, f] w[a, b, c, f]."""
  return _call("dx", dy.shape[:3] + w.shape[2:3], dy, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_weight_grad(x: jax.Array, dy: jax.Array, kernel_shape) -> jax.Array:
  """The transpose of ``conv3x3`` in w: dw[a, b, c, f] = sum over n, i, j of
  x[n, i + a - 1, j + b - 1, c] dy[n, i, j, f]."""
  return _call("dw", tuple(kernel_shape), x, dy)


conv3x3.defvjp(lambda x, w: (conv3x3(x, w), (x, w)),
               lambda res, dy: (conv3x3_input_grad(dy, res[1]), conv3x3_weight_grad(res[0], dy, res[1].shape)))
# <u, dx(dy, w)> = <dy, conv(u, w)> = <w, dw(u, dy)>
conv3x3_input_grad.defvjp(
    lambda dy, w: (conv3x3_input_grad(dy, w), (dy, w)),
    lambda res, u: (conv3x3(u, res[1]), conv3x3_weight_grad(u, res[0], res[1].shape)))
# <v, dw(x, dy)> = <x, dx(dy, v)> = <dy, conv(x, v)>
conv3x3_weight_grad.defvjp(
    lambda x, dy, shape: (conv3x3_weight_grad(x, dy, shape), (x, dy)),
    lambda shape, res, v: (conv3x3_input_grad(res[1], v), conv3x3(res[0], v)))
