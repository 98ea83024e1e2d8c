"""The 4x4 stride-2 up-conv (``nn.ConvTranspose(F, (4, 4), (2, 2), 'SAME')``) in faster
forms with flax's maths and parameters: 'phases' on the CPU, 'subpixel' on GPUs.

Each of the four output phases (row parity, column parity) of a 4x4 stride-2
transposed conv sees a 2x2 subset of the taps, so one 2x2 'VALID' conv of the input
padded by 1, to 4F channels, computes every phase, and the phases interleave
(``phase_conv_transpose``). Why: XLA:CPU's weight gradient of ``nn.ConvTranspose`` is
10-20x slower than a plain conv's (benchmarks/README.md). The conv runs in the forms of
``conv.py``, or in the direct FFI kernels (``ffi.up_conv``) where they are loaded.

'subpixel': a 3x3 conv to 4F channels (the taps a phase does not use held at zero),
then depth-to-space, in XLA's convolution: 9/4 of the FLOPs, but on an H200 the
batch-64 step took 33.5 ms with it against 96.4 ms with flax's ``ConvTranspose``
(benchmarks/README.md), so ``layers()`` passes it on non-CPU backends.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sils_jax.cpu_kernels import ffi
from sils_jax.cpu_kernels.conv import Rules, conv2d, transpose_pair

FORMS = ("phases", "subpixel")
# For lax's 'SAME' transposed conv, output o = 2m + p of an axis receives
# x[m + d] * k[2d + 2 - p] for input offset d in {-1, 0, 1}; index 4 is a zero tap.
# Rows: d + 1; columns: phase p.
_TAP = ((0, 4), (2, 1), (4, 3))


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """Maps a (4, 4, Cin, F) transposed-conv kernel to a (3, 3, Cin, 4F) conv kernel,
  output channels in (row phase, column phase, F) order; built from static slices and
  zeros (a gather's gradient would be a scatter-add)."""
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
  x = x.reshape(b, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, features)


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``ConvTranspose(F, (4, 4), (2, 2), 'SAME')`` as a 3x3 XLA conv to 4F channels,
  then depth-to-space (module doc)."""
  w = subpixel_kernel(kernel)
  y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return depth_to_space(y, kernel.shape[-1])


def phase_kernel(kernel: jax.Array) -> jax.Array:
  """Maps a (4, 4, Cin, F) transposed-conv kernel to a (2, 2, Cin, 4F) conv kernel:
  window tap (a, c) of output phase (py, px), channel order (py, px, F).

  For lax's 'SAME' transposed conv (pad 2 on both sides of the dilated input), output
  o = 2m + p of an axis receives x[m + d] * k[2d + 2 - p]; phase p reads input offsets
  d = p - 1 + a (a in {0, 1}), so tap 2a + p. The mapping is a reshape of each 4-tap
  axis to (a, p) and a transpose (a tap-table gather instead would have a scatter-add
  as gradient, which is slow on the CPU).
  """
  kh, kw, cin, feat = kernel.shape
  if (kh, kw) != (4, 4):
    raise ValueError(f"phase_kernel expects a 4x4 kernel, got {kernel.shape}")
  taps = kernel.reshape(2, 2, 2, 2, cin, feat)  # (a, py, c, px, Cin, F)
  return jnp.transpose(taps, (0, 2, 4, 1, 3, 5)).reshape(2, 2, cin, 4 * feat)


def phase_conv_transpose(x: jax.Array, kernel: jax.Array, rules: Rules = Rules()) -> jax.Array:
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
  if rules.direct and all(ffi.supports_up(cin, feat, d) for d in (x.dtype, kernel.dtype)):
    # the same sums in C++ kernels that write each phase in place (ffi.py)
    return ffi.up_conv(x, phase_kernel(kernel).reshape(2, 2, cin, 2, 2, feat))
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  z = conv2d(xp, phase_kernel(kernel), (1, 1), "VALID", rules).reshape(b, h + 1, w + 1, 2, 2, feat)
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


class ConvTranspose(nn.Module):
  """``nn.ConvTranspose`` for 4x4 stride-2 'SAME' up-convs in the phase or sub-pixel
  form: the same parameters ('kernel' (4, 4, Cin, F), 'bias'), initialisers and call.
  Other shapes are refused (the model has none)."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  rules: Rules = Rules()
  form: str = "phases"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.form not in FORMS:
      raise ValueError(f"ConvTranspose form must be one of {FORMS}, got {self.form!r}")
    if (tuple(self.kernel_size), tuple(self.strides or (1, 1)), self.padding) != ((4, 4), (2, 2), "SAME"):
      raise ValueError("cpu_kernels.ConvTranspose computes 4x4 stride-2 'SAME' up-convs only, got "
                       f"kernel {self.kernel_size}, strides {self.strides}, padding {self.padding!r}")
    kernel = self.param("kernel", self.kernel_init, (4, 4, x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    if self.form == "subpixel":
      y = subpixel_conv_transpose(x.astype(dtype), kernel.astype(dtype))
    else:
      y = phase_conv_transpose(x.astype(dtype), kernel.astype(dtype), self.rules)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y
