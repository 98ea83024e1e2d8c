"""4x4 stride-2 transposed convolution, in forms that XLA runs fast.

A ``nn.ConvTranspose(F, (4, 4), strides=(2, 2), padding='SAME')`` maps an HxW
input to 2Hx2W. Each of the four output phases (row parity, column parity) only
sees a 2x2 subset of the 4x4 taps. Two rewrites as plain stride-1 convolutions:

- 'subpixel': a 3x3 convolution to 4F channels (one group of F per phase, the taps a
  phase does not use held at zero), then depth-to-space. 9/4 of the FLOPs.
- 'phases': a 2x2 'VALID' convolution of the input padded by 1, to 4F channels, then
  each phase's window grid, interleaved (``phase_conv_transpose``). Exactly the
  transposed conv's FLOPs, and a patch matrix of 4 slices instead of 9.
- 'auto': 'phases' on CPU, where it measured 1.75x faster than 'subpixel' forward +
  backward over the decoder (``benchmarks/README.md``), 'subpixel' elsewhere (the
  form the GPU numbers were measured with).

The parameters keep the ``ConvTranspose`` layout (``kernel`` 4x4xCinxF, ``bias`` F):
every form, and flax's ``ConvTranspose`` ('transpose'), is interchangeable on the
same weights, which ``tests/test_models.py`` checks.

Why not ConvTranspose itself: on XLA:CPU its weight gradient is 10-20x slower than a
plain convolution's (see ``../shared/STYLE.md``).

Mixed precision: the kernel is a ``param_dtype`` (float32) parameter, mapped to the
conv layout in that dtype; only the mapped kernel and the input are cast to
``dtype`` for the convolution.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sils_jax.models import direct_conv
from sils_jax.models.conv import conv2d, takes_direct, transpose_pair

UPSAMPLE_IMPLS = ("auto", "subpixel", "phases", "transpose")

# For a 1-D transposed conv with kernel 4, stride 2 and lax 'SAME' padding
# (pad 2 on both sides of the dilated input), output o = 2m + p receives
# x[m + d] * k[2d + 2 - p] for input offset d in {-1, 0, 1}. Index 4 points to
# an appended zero tap. Rows: d + 1; columns: phase p.
_TAP = np.array([[0, 4], [2, 1], [4, 3]], dtype=np.int32)


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """Maps a (4, 4, Cin, F) transposed-conv kernel to a (3, 3, Cin, 4F) conv kernel.

  Output channel order is (row phase, column phase, F). Built from static slices and
  zeros, not by indexing with ``_TAP`` (a gather, whose gradient is a scatter-add into
  zeros: 8% of the CPU step at batch 1, benchmarks/README.md); the same values.
  """
  kh, kw, cin, feat = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f"subpixel_kernel expects a 4x4 kernel, got {kernel.shape}")
  zero_row = jnp.zeros((4, cin, feat), kernel.dtype)
  rows = jnp.stack([jnp.stack([kernel[t] if t < 4 else zero_row for t in _TAP[dy]])
                    for dy in range(3)])  # (3 dy, 2 py, 4, Cin, F)
  zero_col = jnp.zeros((3, 2, cin, feat), kernel.dtype)
  taps = jnp.stack([jnp.stack([rows[:, :, t] if t < 4 else zero_col for t in _TAP[dx]], axis=2)
                    for dx in range(3)], axis=2)  # (3 dy, 2 py, 3 dx, 2 px, Cin, F)
  taps = jnp.transpose(taps, (0, 2, 4, 1, 3, 5))  # (dy, dx, Cin, py, px, F)
  return taps.reshape(3, 3, cin, 4 * feat)


def depth_to_space(x: jax.Array, features: int) -> jax.Array:
  """(B, H, W, 2*2*F) with channel order (py, px, F) -> (B, 2H, 2W, F)."""
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, 2, 2, features)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, 2 * h, 2 * w, features)


class SubpixelConvTranspose(nn.Module):
  """Equivalent of ``nn.ConvTranspose(features, (4, 4), (2, 2), 'SAME')``, same parameters.

  ``form='subpixel'``: a 3x3 conv to 4F channels, then depth-to-space (module docstring).
  ``form='phases'``: ``phase_conv_transpose``, a 2x2 conv to 4F channels with the exact
  FLOPs of the transposed conv.
  """

  features: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"  # models/conv.py (form 'subpixel')
  form: str = "subpixel"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (4, 4, cin, self.features),
                        self.param_dtype)
    dtype = self.dtype or x.dtype
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
            if self.use_bias else None)
    if self.form == "phases":
      y = phase_conv_transpose(x.astype(dtype), kernel.astype(dtype), self.conv_impl)
      return y if bias is None else y + bias
    w = subpixel_kernel(kernel).astype(dtype)  # map in param_dtype, then cast
    y = conv2d(x.astype(dtype), w, (1, 1), "SAME", self.conv_impl)
    if bias is not None:
      y = y + jnp.tile(bias, 4)
    return depth_to_space(y, self.features)


def phase_kernel(kernel: jax.Array) -> jax.Array:
  """Maps a (4, 4, Cin, F) transposed-conv kernel to a (2, 2, Cin, 4F) conv kernel:
  window tap (a, c) of output phase (py, px), channel order (py, px, F).

  Phase p of an axis reads input offsets d = p - 1 + a (a in {0, 1}); by ``_TAP``
  (row d + 1, column p) that is tap 2a + p. So the mapping is a reshape of each
  4-tap axis to (a, p) and a transpose, whose gradient is a transpose too. (Indexing
  the kernel with a tap table instead compiles to a gather, whose gradient is a
  scatter-add into zeros: 12% of the CPU step at batch 1, benchmarks/README.md.)
  """
  kh, kw, cin, feat = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f"phase_kernel expects a 4x4 kernel, got {kernel.shape}")
  taps = kernel.reshape(2, 2, 2, 2, cin, feat)  # (a, py, c, px, Cin, F)
  return jnp.transpose(taps, (0, 2, 4, 1, 3, 5)).reshape(2, 2, cin, 4 * feat)


def phase_conv_transpose(x: jax.Array, kernel: jax.Array, conv_impl: str = "auto") -> jax.Array:
  """``ConvTranspose(F, (4, 4), (2, 2), 'SAME')`` with exactly its FLOPs.

  Output phase (py, px) at input position (m, n) reads the 2x2 input window starting
  at (m + py - 1, n + px - 1) with that phase's 2x2 taps. So one 2x2 'VALID' conv of
  the input padded by 1, to 4F channels (every phase's taps), gives every phase at
  every window position, (H + 1) x (W + 1); phase (py, px) is its window grid shifted
  by (py, px), and the four interleave to 2H x 2W. One patch matrix of 4 slices
  serves all four phases: 16 Cin F multiply-adds per input position, as the
  transposed conv, against 36 Cin F for the sub-pixel form's 3x3 conv.
  """
  b, h, w, cin = x.shape
  feat = kernel.shape[-1]
  if takes_direct(conv_impl, all(direct_conv.supports_up(cin, feat, d) for d in (x.dtype, kernel.dtype))):
    # the same sums in C++ kernels that write each phase in place (direct_conv.py)
    return direct_conv.up_conv(x, phase_kernel(kernel).reshape(2, 2, cin, 2, 2, feat))
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  z = conv2d(xp, phase_kernel(kernel), (1, 1), "VALID", conv_impl).reshape(b, h + 1, w + 1, 2, 2, feat)
  return interleave_phases(z)


@jax.custom_vjp
def interleave_phases(z: jax.Array) -> jax.Array:
  """(B, H + 1, W + 1, 2, 2, F) window grids of the four phases -> (B, 2H, 2W, F):
  output (2m + py, 2n + px) is phase (py, px)'s window (m + py, n + px)."""
  b, h, w, _, _, feat = z.shape
  h, w = h - 1, w - 1
  rows = [jnp.stack([z[:, py:py + h, px:px + w, py, px] for px in range(2)], axis=3) for py in range(2)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, feat)  # (b, h, py, w, px, F)


@jax.custom_vjp
def scatter_phases(y: jax.Array) -> jax.Array:
  """The transpose of ``interleave_phases``: each output pixel back to its phase's
  window, zeros in the row and column of windows its phase does not reach. One
  stacked write, where autodiff's transpose adds four tensors of the full (H + 1,
  W + 1, 2, 2, F) size, each zero but in its phase's slot."""
  b, h2, w2, feat = y.shape
  y = y.reshape(b, h2 // 2, 2, w2 // 2, 2, feat)
  return jnp.stack([jnp.stack([jnp.pad(y[:, :, py, :, px], ((0, 0), (py, 1 - py), (px, 1 - px), (0, 0)))
                               for px in range(2)], axis=3) for py in range(2)], axis=3)


transpose_pair(interleave_phases, scatter_phases)


def resolve_upsample(impl: str) -> str:
  """'auto': 'phases' on the CPU backend (the fastest form there, benchmarks/README.md),
  'subpixel' on every other backend (the form measured on GPU)."""
  if impl not in UPSAMPLE_IMPLS:
    raise ValueError(f"config.upsample must be one of {UPSAMPLE_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return "phases" if jax.default_backend() == "cpu" else "subpixel"


def upsample_conv(features: int, impl: str, *, use_bias: bool = True, dtype: Any = None,
                  conv_impl: str = "auto", name: str | None = None) -> nn.Module:
  """A 4x4 stride-2 upsampling conv, ``impl`` in UPSAMPLE_IMPLS (same maths, same parameters)."""
  impl = resolve_upsample(impl)
  if impl in ("subpixel", "phases"):
    return SubpixelConvTranspose(features, use_bias=use_bias, dtype=dtype, conv_impl=conv_impl,
                                 form=impl, name=name)
  if impl == "transpose":
    return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME", use_bias=use_bias,
                            dtype=dtype, name=name)
  raise AssertionError(impl)  # resolve_upsample rejected anything else
