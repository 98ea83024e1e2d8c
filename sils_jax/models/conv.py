"""2-D convolution as XLA's convolution or as patches x matrix (im2col), same maths.

XLA:CPU runs convolutions, and above all their weight gradients, slowly when the
feature map is small and the channels many: a 3x3 conv of a 2x2x256 map to 512
channels took 20 ms forward + backward on our 2-core CPU, against 2.8 ms for the
same product written as one matrix multiply over the 9 shifted input slices
(``benchmarks/README.md``, "Training step: JAX against PyTorch"). On large maps XLA's own
convolution is faster (the patches cost memory traffic), and on GPUs cuDNN is.

``impl``:
  'xla'     ``lax.conv_general_dilated``.
  'matmul'  the input's k x k shifted (strided) slices, concatenated on the channel
            axis, times the kernel reshaped to (k*k*Cin, Cout). Its gradients are
            matrix multiplies and slice-adds.
  'xla_pad' XLA's convolution with the input channels zero-padded (input and kernel)
            to a multiple of 4 (8 for 16-bit dtypes): same values, and the shape
            cuDNN's tensor-core kernels need. On an H200 the 3-channel first convs of
            the encoders ran as an NCHW 'indexed' TF32 kernel taking 10.1 of the
            33.5 ms batch-64 step (benchmarks/README.md); this form is not timed on a
            GPU yet, so 'auto' does not pick it.
  'auto'    'matmul' on the CPU backend, except for convolutions to few channels
            (< ``MATMUL_MIN_FEATURES``) over many output positions (batch x height x
            width > ``MATMUL_MAX_THIN_POSITIONS``), where the patch matrix's gradient
            costs more than XLA's convolution; 'xla' on every other backend.

Both use the same kernel (kh, kw, Cin, Cout) and padding, so parameters, checkpoints
and results are interchangeable (``tests/test_models.py`` checks values and
gradients).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "matmul", "xla_pad")
# From the per-layer sweep in benchmarks/README.md (every conv of the synthetic model
# at 64/128 px, batch 1/8): the matrix form was faster for most layers (up to 15x for
# small maps with many channels) and clearly slower only for the 3-channel output
# conv at >= 32768 positions (2-4x).
MATMUL_MIN_FEATURES = 8
MATMUL_MAX_THIN_POSITIONS = 16384


def _pads(size: int, k: int, s: int, padding) -> tuple[int, int]:
  if padding == "SAME":
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2
  if padding == "VALID":
    return 0, 0
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def resolve_impl(impl: str, positions: int, features: int) -> str:
  if impl not in IMPLS:
    raise ValueError(f"config.conv_impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  thin = features < MATMUL_MIN_FEATURES and positions > MATMUL_MAX_THIN_POSITIONS
  return "xla" if thin else "matmul"


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: str = "SAME",
           impl: str = "auto") -> jax.Array:
  """NHWC input, HWIO kernel -> NHWC output."""
  kh, kw, cin, cout = kernel.shape
  b, h, w, c = x.shape
  if c != cin:
    raise ValueError(f"conv2d: input has {c} channels, kernel expects {cin}")
  sh, sw = strides
  (pt, pb), (pl, pr) = _pads(h, kh, sh, padding), _pads(w, kw, sw, padding)
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  resolved = resolve_impl(impl, b * ho * wo, cout)
  if resolved == "xla_pad":
    extra = -cin % (8 if jnp.dtype(x.dtype).itemsize == 2 else 4)
    if extra:  # zero channels in the input meet zero rows of the kernel: same sums
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    resolved = "xla"
  if resolved == "xla":
    return jax.lax.conv_general_dilated(x, kernel, tuple(strides), ((pt, pb), (pl, pr)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if kh == kw == 1 and sh == sw == 1:
    return x @ kernel.reshape(cin, cout)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)  # (B, Ho, Wo, kh*kw*Cin), order (i, j, c) = HWIO's
  return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
  """``nn.Conv`` with a choice of implementation; the same parameters ('kernel', 'bias')."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = conv2d(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding, self.impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y
