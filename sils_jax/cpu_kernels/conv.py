"""2-D convolution on the CPU as patches x matrix (im2col), as Winograd's F(2x2, 2x2),
or in the direct FFI kernels (``ffi.py``): the same maths as ``nn.Conv``.

XLA:CPU runs convolutions, and above all their weight gradients, slowly when the
feature map is small and the channels many; written as one matrix product over the
shifted input windows they run several times faster (benchmarks/README.md).

Which form a conv takes (``Rules``, a frozen value):
  direct    where the FFI kernels are loaded and support it (``ffi.supports``,
            ``ffi.supports_strided``), except the 4x4 stride-2 convs where Winograd
            pays over fewer than ``direct_over_winograd_positions`` output positions.
  winograd  4x4 stride-2 float32 convs with >= ``winograd_min_channels`` input
            channels that do not narrow them, over >= ``winograd_min_positions``
            output positions: Winograd's F(2x2, 2x2) on their space-to-depth blocks,
            9/16 of the multiply-adds (``winograd_2x2``).
  matrix    every other conv: a stride-s conv whose kernel s divides runs as a
            stride-1 conv of the input's space-to-depth blocks; a conv that widens the
            channels (C <= F) is its patch matrix times the kernel, one that narrows
            them (C > F) applies every tap first and adds the shifted results. The
            gradients are written out in ``custom_vjp``s whose backward passes are
            differentiable again (the discriminators' R1 penalty), and every linear
            rearrangement comes with its hand-written transpose (``transpose_pair``):
            autodiff's transpose of k slices adds k full-size zero-padded tensors.

Every form uses nn.Conv's kernel (kh, kw, Cin, Cout) and padding, so parameters and
checkpoints are interchangeable (tests/test_cpu_kernels.py checks values, gradients
and second-order gradients against ``nn.Conv``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sils_jax.cpu_kernels import ffi


@dataclasses.dataclass(frozen=True)
class Rules:
  """Which CPU form each conv takes (module doc); thresholds from the per-layer
  sweeps in benchmarks/README.md. Frozen: modules hold it as a field."""
  direct: bool = False  # the FFI kernels (only once ``ffi.load()`` succeeded)
  winograd: bool = True
  winograd_min_channels: int = 16
  winograd_min_positions: int = 2048
  direct_over_winograd_positions: int = 8192


def _pads(size: int, k: int, s: int, padding) -> tuple[int, int]:
  if padding == "SAME":
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2
  if padding == "VALID":
    return 0, 0
  raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")


def _strided_direct_pays(x_shape, kernel_shape, strides, padding, rules: Rules, *dtypes) -> bool:
  """Whether a 4x4 stride-2 conv runs as ``ffi.strided_conv``: where the kernels
  support it, except where Winograd pays over few positions (module doc)."""
  b, h, w, _ = x_shape
  if not (rules.direct and all(ffi.supports_strided(x_shape, kernel_shape, strides, padding, d) for d in dtypes)):
    return False
  positions = b * (h // 2) * (w // 2)
  return not (_winograd_pays(kernel_shape, strides, positions, dtypes[0], rules)
              and positions < rules.direct_over_winograd_positions)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: str = "SAME",
           rules: Rules = Rules()) -> jax.Array:
  """NHWC input, HWIO kernel -> NHWC output, in the form ``rules`` picks."""
  kh, kw, cin, cout = kernel.shape
  b, h, w, c = x.shape
  if c != cin:
    raise ValueError(f"conv2d: input has {c} channels, kernel expects {cin}")
  sh, sw = strides
  (pt, pb), (pl, pr) = _pads(h, kh, sh, padding), _pads(w, kw, sw, padding)
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  if rules.direct and all(ffi.supports(kernel.shape, strides, padding, d) for d in (x.dtype, kernel.dtype)):
    return ffi.conv3x3(x, kernel)
  if _strided_direct_pays(x.shape, kernel.shape, strides, padding, rules, x.dtype, kernel.dtype):
    return ffi.strided_conv(x, kernel)
  wino = rules.winograd and _winograd_pays(kernel.shape, strides, b * ho * wo, x.dtype, rules)
  if kh == kw == 1 and sh == sw == 1:
    return x @ kernel.reshape(cin, cout)
  if (sh, sw) != (1, 1) and kh % sh == 0 and kw % sw == 0:
    return _strided_as_space_to_depth(x, kernel, (sh, sw), ((pt, pb), (pl, pr)), (ho, wo), wino)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  if (sh, sw) == (1, 1):
    return window_matmul(xp, kernel.reshape(kh * kw * cin, cout), kh, kw, 1)
  cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)  # (B, Ho, Wo, kh*kw*Cin), order (i, j, c) = HWIO's
  return patches @ kernel.reshape(kh * kw * cin, cout)


def _winograd_pays(kernel_shape: Sequence[int], strides: Sequence[int], positions: int, dtype,
                   rules: Rules) -> bool:
  """Whether this conv runs as ``winograd_2x2`` (module doc)."""
  kh, kw, cin, cout = kernel_shape
  return ((kh, kw) == (4, 4) and tuple(strides) == (2, 2) and cin >= rules.winograd_min_channels
          and cout >= cin and positions >= rules.winograd_min_positions and jnp.dtype(dtype).itemsize == 4)


def _strided_as_space_to_depth(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                               pads: Sequence[tuple[int, int]], out_hw: tuple[int, int],
                               wino: bool = False) -> jax.Array:
  """A (kh, kw) conv with strides (sh, sw) dividing the kernel, as a stride-1
  (kh/sh, kw/sw) conv of the padded input's space-to-depth (sh*sw*Cin channels).

  Tap (i, j) = (a*sh + p, b*sw + q) of output (o, u) reads padded input
  (o*sh + i, u*sw + j): row-block o + a, column-block u + b, in-block offset (p, q).
  So the conv reads (kh/sh)*(kw/sw) contiguous windows of the blocked input instead
  of kh*kw strided ones: the same products, but its gradient adds back 4 shifted
  windows instead of scattering 16 strided slices (4x4 stride 2), which made the
  discriminators' second-order R1 gradient 2-5x slower per layer
  (benchmarks/README.md).
  """
  kh, kw, cin, cout = kernel.shape
  (sh, sw), ((pt, pb), (pl, pr)), (ho, wo) = strides, pads, out_hw
  b = x.shape[0]
  ka, kb = kh // sh, kw // sw
  hb, wb = ho + ka - 1, wo + kb - 1  # blocks the outputs read
  # pad (or crop: rows past the last window are never read) to hb*sh x wb*sw
  xp = jnp.pad(x, ((0, 0), (pt, 0), (pl, 0), (0, 0)))
  xp = xp[:, :hb * sh, :wb * sw]
  xp = jnp.pad(xp, ((0, 0), (0, hb * sh - xp.shape[1]), (0, wb * sw - xp.shape[2]), (0, 0)))
  blocks = xp.reshape(b, hb, sh, wb, sw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, hb, wb, sh * sw * cin)
  if wino:  # 2x2 taps (a, b), each a (4 Cin, F) block in the blocks' channel order (p, q, c)
    taps = kernel.reshape(ka, sh, kb, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    return winograd_2x2(blocks, taps.reshape(ka, kb, sh * sw * cin, cout))
  # patch channels in the kernel's own order (i, j, c) = (a, p, b, q, c): sh pieces
  # per window, so that the kernel is only reshaped (a transposed copy of it costs
  # more than the extra pieces at batch 1)
  return window_matmul(blocks, kernel.reshape(kh * kw * cin, cout), ka, kb, sh)


def transpose_pair(f, ft) -> None:
  """Declares the linear maps ``f`` and ``ft`` (``custom_vjp`` functions of one array
  followed by their static arguments) each other's transpose: the VJP of each is the
  other, so every order of gradient through them stays a single rearrangement.
  Autodiff's transpose of a slice is a zero-padded tensor of the full size, so its
  transpose of k taps read side by side (or k shifted slices added) would add k
  full-size tensors where one stacked write does."""
  for a, b in ((f, ft), (ft, f)):
    # bwd gets (*static, residual, cotangent)
    a.defvjp(lambda x, *static, a=a: (a(x, *static), None), lambda *args, b=b: (b(args[-1], *args[:-2]),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _patches(xp: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """(B, Hp, Wp, C) -> (B, Hp-ka+1, Wp-kb+1, ka*kb*C): for window offset a, channel
  piece p (of ``split`` equal pieces), window offset b, that piece; order (a, p, b, c')."""
  ho, wo = xp.shape[1] - ka + 1, xp.shape[2] - kb + 1
  q = xp.shape[3] // split
  return jnp.concatenate([xp[:, a:a + ho, b:b + wo, p * q:(p + 1) * q]
                          for a in range(ka) for p in range(split) for b in range(kb)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _col2im(dpatches: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """The transpose of ``_patches``: adds every patch entry back where it was read."""
  bsz, ho, wo, k = dpatches.shape
  q = k // (ka * kb * split)
  d = dpatches.reshape(bsz, ho, wo, ka, split, kb, q)
  return sum(jnp.pad(d[:, :, :, a, :, b].reshape(bsz, ho, wo, split * q),
                     ((0, 0), (a, ka - 1 - a), (b, kb - 1 - b), (0, 0)))
             for a in range(ka) for b in range(kb))


# ``_col2im``'s transpose is met in the R1 penalty's second-order gradient
transpose_pair(_patches, _col2im)


def _narrows(kmat: jax.Array, ka: int, kb: int) -> bool:
  """Whether the conv narrows the channels (C > F): then ``_shift_form``'s widest
  tensor, ka*kb*F channels, is narrower than the patch matrix's ka*kb*C. (A rule
  that also weighed the kernel's rearranged copies against small maps' patches
  measured the same at batch 1 and no better at batch 8.)"""
  return kmat.shape[0] // (ka * kb) > kmat.shape[1]


def _shift_kernel(kmat: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """kmat (rows (a, p, b, c')) -> (C, ka*kb*F): every tap's (C, F) block side by side."""
  k, f = kmat.shape
  q = k // (ka * kb * split)
  return kmat.reshape(ka, split, kb, q, f).transpose(1, 3, 0, 2, 4).reshape(split * q, ka * kb * f)


def _shift_form(xp: jax.Array, kmat: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """The same conv with every tap applied first: z = xp @ (C, ka*kb*F), then each
  output sums tap (a, b)'s F channels of z at its offset. No patch matrix: the
  widest tensor is ka*kb*F channels instead of ka*kb*C, for convs that narrow."""
  bsz, hp, wp, _ = xp.shape
  f = kmat.shape[-1]
  ho, wo = hp - ka + 1, wp - kb + 1
  # the taps' partial sums are added in float32 for 16-bit inputs, as one product
  # would accumulate them, then rounded once
  acc = jnp.float32 if jnp.dtype(xp.dtype).itemsize < 4 else None
  z = jnp.matmul(xp, _shift_kernel(kmat, ka, kb, split), preferred_element_type=acc)
  y = _shifted_sum(z.reshape(bsz, hp, wp, ka * kb, f), ka, kb)
  return y.astype(jnp.result_type(xp.dtype, kmat.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _shifted_sum(z: jax.Array, ka: int, kb: int) -> jax.Array:
  """(B, Hp, Wp, ka*kb, F) -> (B, Hp-ka+1, Wp-kb+1, F): the sum over taps (a, b) of
  tap a*kb + b's map shifted by (a, b)."""
  ho, wo = z.shape[1] - ka + 1, z.shape[2] - kb + 1
  return sum(z[:, a:a + ho, b:b + wo, a * kb + b] for a in range(ka) for b in range(kb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _shifted_stack(y: jax.Array, ka: int, kb: int) -> jax.Array:
  """The transpose of ``_shifted_sum``: tap (a, b)'s slot holds ``y`` shifted back by
  (a, b), zero-padded. One stacked write, where autodiff's transpose adds ka*kb
  tensors of the full (Hp, Wp, ka*kb, F) size, each zero but in one tap's slot."""
  return jnp.stack([jnp.pad(y, ((0, 0), (a, ka - 1 - a), (b, kb - 1 - b), (0, 0)))
                    for a in range(ka) for b in range(kb)], axis=3)


transpose_pair(_shifted_sum, _shifted_stack)


def window_matmul(xp: jax.Array, kmat: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """The stride-1 'VALID' (ka, kb) convolution of ``xp`` with the kernel matrix
  ``kmat`` (rows in ``_patches``' order): ``_patches(xp) @ kmat``.

  Convs that narrow the channels run in ``_shift_form`` instead (``_narrows``), and
  the gradients are written out (``_window_matmul_bwd``) so that no ka*kb*C-wide
  tensor is built for them either. Same products and sums in every form.
  """
  return _window_matmul(xp, kmat, ka, kb, split, _narrows(kmat, ka, kb))


def _pad_axis(x: jax.Array, axis: int, lo: int, hi: int) -> jax.Array:
  return jnp.pad(x, [(lo, hi) if i == axis else (0, 0) for i in range(x.ndim)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile3(x: jax.Array, axis: int) -> jax.Array:
  """Winograd F(2, 2)'s input transform along ``axis`` (size 2n + 1): tile i's rows
  (d0, d1, d2) = (2i, 2i+1, 2i+2) -> (d0 - d1, d1, d2 - d1), stacked in a new
  leading axis: (3, ..., n, ...)."""
  n = (x.shape[axis] - 1) // 2
  d0, d1, d2 = (jax.lax.slice_in_dim(x, t, t + 2 * n - 1, 2, axis) for t in range(3))
  return jnp.stack([d0 - d1, d1, d2 - d1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _untile3(u: jax.Array, axis: int) -> jax.Array:
  """The transpose of ``_tile3``: even row 2i gets u0 of tile i and u2 of tile i - 1,
  odd row 2i + 1 gets u1 - u0 - u2 of tile i; written as one interleave, where
  autodiff would pad every strided slice to full size and add them."""
  u0, u1, u2 = u[0], u[1], u[2]
  n = u0.shape[axis]
  even = _pad_axis(u0, axis, 0, 1) + _pad_axis(u2, axis, 1, 0)
  odd = _pad_axis(u1 - u0 - u2, axis, 0, 1)
  shape = list(even.shape)
  shape[axis] = 2 * n + 2
  y = jnp.stack([even, odd], axis=axis + 1).reshape(shape)
  return jax.lax.slice_in_dim(y, 0, 2 * n + 1, axis=axis)


transpose_pair(_tile3, _untile3)  # the R1 penalty differentiates the input gradient again


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _untile2(mm: jax.Array, axis: int) -> jax.Array:
  """Winograd F(2, 2)'s output transform: (m0, m1, m2) in the leading axis -> rows
  (2i, 2i+1) = (m0 + m1, m1 + m2) along ``axis`` of the result (counted without
  the leading axis)."""
  shape = list(mm.shape[1:])
  shape[axis] *= 2
  return jnp.stack([mm[0] + mm[1], mm[1] + mm[2]], axis=axis + 1).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile2(y: jax.Array, axis: int) -> jax.Array:
  """The transpose of ``_untile2``: rows (2i, 2i+1) = (e, o) -> (e, e + o, o) in a new
  leading axis; one stacked write, where autodiff's transpose adds four tensors of
  the full (3, ...) size."""
  shape = list(y.shape)
  shape[axis:axis + 1] = [shape[axis] // 2, 2]
  y = y.reshape(shape)
  e, o = (jax.lax.index_in_dim(y, t, axis + 1, keepdims=False) for t in range(2))
  return jnp.stack([e, e + o, o])


transpose_pair(_untile2, _tile2)


def winograd_2x2(xp: jax.Array, k: jax.Array) -> jax.Array:
  """The stride-1 'VALID' 2x2 convolution of ``xp`` (B, Hp, Wp, C) with ``k``
  (2, 2, C, F), as Winograd's F(2x2, 2x2): 9 products per 2x2 output tile instead of
  16, as one matrix product batched over the 9 (B*tiles, C) @ (C, F) pieces, with
  transforms whose coefficients are 0 and +-1 (no division, so no rounding beyond
  the sums').

  Per axis: y0 = d0 g0 + d1 g1 and y1 = d1 g0 + d2 g1 are m0 + m1 and m1 + m2, where
  m0 = (d0 - d1) g0, m1 = d1 (g0 + g1), m2 = (d2 - d1) g1.
  """
  bsz, hp, wp, c = xp.shape
  f = k.shape[-1]
  ho, wo = hp - 1, wp - 1
  n, m = -(-ho // 2), -(-wo // 2)
  if (2 * n + 1, 2 * m + 1) != (hp, wp):  # odd output: one more row / column, cropped below
    xp = jnp.pad(xp, ((0, 0), (0, 2 * n + 1 - hp), (0, 2 * m + 1 - wp), (0, 0)))
  u = _tile3(_tile3(xp, 2), 2)  # columns, then rows: (3 rows, 3 cols, B, n, m, C)
  g = jnp.stack([k[0], k[0] + k[1], k[1]])  # the kernel's transform, rows: (3, 2 cols, C, F)
  v = jnp.stack([g[:, 0], g[:, 0] + g[:, 1], g[:, 1]], axis=1)  # (3 rows, 3 cols, C, F)
  mm = jax.lax.dot_general(u.reshape(9, bsz * n * m, c), v.reshape(9, c, f), (((2,), (1,)), ((0,), (0,))))
  y = _untile2(_untile2(mm.reshape(3, 3, bsz, n, m, f), 2), 2)  # rows, then columns: (B, 2n, 2m, F)
  return y[:, :ho, :wo]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _window_matmul(xp, kmat, ka, kb, split, shift):
  return _window_matmul_fwd(xp, kmat, ka, kb, split, shift)[0]


def _window_matmul_fwd(xp, kmat, ka, kb, split, shift):
  if shift:
    return _shift_form(xp, kmat, ka, kb, split), (xp, kmat)
  patches = _patches(xp, ka, kb, split)
  return patches @ kmat, (patches, kmat)


def _window_matmul_bwd(ka, kb, split, shift, res, dy):
  inp, kmat = res  # the patches, or for the shift form the padded input
  dx = _input_grad(dy, kmat, ka, kb, split)
  if not shift:
    return dx, jnp.einsum("bhwk,bhwf->kf", inp, dy)
  # shift form: dz, the cotangent of z, is the padded dy's patches (taps reversed),
  # and the kernel gradient is xp^T dz, mapped back to kmat's rows
  f = kmat.shape[-1]
  q = inp.shape[-1] // split
  g = jnp.einsum("bhwc,bhwk->ck", inp, _patches(_full_pad(dy, ka, kb), ka, kb, 1))  # (C, (a', b', f)), a' = ka-1-a
  g = g.reshape(split, q, ka, kb, f)[:, :, ::-1, ::-1].transpose(2, 0, 3, 1, 4)
  return dx, g.reshape(ka * split * kb * q, f)


def _full_pad(dy: jax.Array, ka: int, kb: int) -> jax.Array:
  """dy padded by the window size - 1 on every side: its (ka, kb) windows are the
  input positions' 'full' correlation windows."""
  return jnp.pad(dy, ((0, 0), (ka - 1, ka - 1), (kb - 1, kb - 1), (0, 0)))


def _correlates(dy_shape: Sequence[int], kmat: jax.Array, ka: int, kb: int) -> bool:
  """Whether ``_input_grad`` takes the 'correlate' form: positions * (C - F) > C * F."""
  bsz, ho, wo, f = dy_shape
  c = kmat.shape[0] // (ka * kb)
  return bsz * ho * wo * (c - f) > c * f


def _input_grad(dy: jax.Array, kmat: jax.Array, ka: int, kb: int, split: int) -> jax.Array:
  """The input gradient of ``window_matmul`` for the output cotangent ``dy``:

  - 'scatter': the patch gradient ``dy @ kmat.T`` (ka*kb*C wide) added back where
    each entry was read (``_col2im``), what autodiff of the product gives;
  - 'correlate': the 'full' correlation of ``dy`` with the flipped kernel, itself a
    ``window_matmul`` of the padded ``dy`` (patches ka*kb*F wide) with the kernel
    rearranged to (ka*kb*F, C).

  Same products and sums; 'correlate' moves F instead of C channels per patch entry,
  plus one rearranged copy of the kernel, so it is taken when the conv narrows the
  channels over enough positions (``_correlates``).
  """
  if _correlates(dy.shape, kmat, ka, kb):
    f = dy.shape[-1]
    c = kmat.shape[0] // (ka * kb)
    w = kmat.reshape(ka, split, kb, c // split, f)[::-1, :, ::-1].transpose(0, 2, 4, 1, 3)
    return window_matmul(_full_pad(dy, ka, kb), w.reshape(ka * kb * f, c), ka, kb, 1)
  return _col2im(dy @ kmat.T, ka, kb, split)


_window_matmul.defvjp(_window_matmul_fwd, _window_matmul_bwd)


class Conv(nn.Module):
  """``nn.Conv`` (no dilation, groups or masks) in the CPU forms of ``rules``: the same
  parameters ('kernel', 'bias'), initialisers and call."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  rules: Rules = Rules()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    y = conv2d(x.astype(dtype), kernel.astype(dtype), strides, self.padding, self.rules)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y
