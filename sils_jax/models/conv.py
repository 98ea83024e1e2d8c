"""2-D convolution as XLA's convolution, as patches x matrix (im2col) or as Winograd's
F(2x2, 2x2), same maths.

XLA:CPU runs convolutions, and above all their weight gradients, slowly when the
feature map is small and the channels many: a 3x3 conv of a 2x2x256 map to 512
channels took 20 ms forward + backward on our 2-core CPU, against 2.8 ms for the
same product written as one matrix multiply over the 9 shifted input slices
(``benchmarks/README.md``, "Training step: JAX against PyTorch"). On large maps XLA's own
convolution is faster (the patches cost memory traffic), and on GPUs cuDNN is.

``impl``:
  'xla'     ``lax.conv_general_dilated``.
  'matmul'  matrix products (``window_matmul``): a stride-s conv whose kernel s
            divides runs as a stride-1 conv of the input's space-to-depth blocks;
            then a conv that widens the channels (C <= F) is its patch matrix (the
            input's shifted windows side by side) times the kernel, and one that
            narrows them (C > F) applies every tap first (input @ (C, k*k*F)) and
            adds the shifted results, with no k*k*C-wide patch matrix. The input
            gradient is either the patch gradient added back or a correlation of
            the output gradient, whichever moves fewer channels. All of these are
            written out in a ``custom_vjp`` whose backward pass is differentiable
            again (the discriminators' R1 penalty). The linear rearrangements they
            are built from (``_patches`` and its adding-back ``_col2im``, the shift
            form's ``_shifted_sum``, Winograd's transforms) come in pairs, each the
            other's transpose and custom VJP. Autodiff's transpose of a slice is a
            zero-padded tensor of the full size, so its transpose of a gather of
            k taps added k full-size tensors where one stacked write does; the R1
            penalty's second-order gradient runs through every one of them
            (benchmarks/README.md: the step in 0.92-0.95 of the time, same values).
  'xla_pad' XLA's convolution with the input channels zero-padded (input and kernel)
            to a multiple of 4 (8 for 16-bit dtypes): same values, and the shape
            cuDNN's tensor-core kernels need. On an H200 the 3-channel first convs of
            the encoders ran as an NCHW 'indexed' TF32 kernel taking 10.1 of the
            33.5 ms batch-64 step (benchmarks/README.md); this form is not timed on a
            GPU yet, so 'auto' does not pick it.
  'winograd' 'matmul', except for the 4x4 stride-2 float32 convs with at least
            ``WINOGRAD_MIN_CHANNELS`` input channels that do not narrow them, over at
            least ``WINOGRAD_MIN_POSITIONS`` output positions (at 128x128, batch 8:
            the encoders' second and third convs and the discriminators' second and
            third, the step's costliest: they also run in the R1 penalty's
            second-order gradient). Those run as Winograd's F(2x2, 2x2)
            (``winograd_2x2``) on their space-to-depth blocks: 9 products per 2x2
            output tile instead of 16, so 9/16 of the multiply-adds, in one batched
            matrix product; the transforms add and subtract only. In one process,
            128x128, batch 8: 0.91-0.94 of the 'matmul' step (benchmarks/README.md).
            Smaller maps (every conv at batch 1) and the up-convs measured slower in
            this form, so they keep 'matmul'; the thin output conv takes ``_thin_conv``, as
            with 'auto'.
  'direct'  'winograd', except for the convs the direct-conv CPU kernels take
            (``direct_conv.py``, C++ through XLA's FFI, reading each input window in
            place): the decoder's output conv (``direct_conv.supports``: 3x3, stride
            1, 16k -> 1-3 channels), its up-convs with 16-128 input channels
            (``upsample.phase_conv_transpose``) and the 4x4 stride-2 convs of
            even-sized inputs with 16k input and output channels, or 1-4 input
            channels and 16, 32 or 64 outputs (the first convs, on images)
            (``_strided_direct_pays``: all of them but where Winograd pays over fewer
            than ``DIRECT_OVER_WINOGRAD_POSITIONS`` positions). In one process at
            128x128 the step took 0.78 of 'winograd''s time at batch 8 and 0.94 at
            batch 1 with the decoder's kernels, then 0.90 and 0.94 of that with the
            strided ones, then 0.96 of that at both batch sizes with the first convs
            (benchmarks/README.md). Float32 on the CPU backend only; a clear error if
            the kernels cannot be built.
  'auto'    'direct' on the CPU backend where the kernels built (else 'winograd': one
            warning says why); 'xla' on every other backend. Without the kernels, and
            in a process where glibc does not keep freed memory
            (``sils_jax/cpu_memory.py``; ``python -m sils_jax.main`` does keep it),
            convolutions to few channels (< ``MATMUL_MIN_FEATURES``) over many output
            positions (batch x height x width > ``MATMUL_MAX_THIN_POSITIONS``; the
            output conv at 128x128 and batch 8) run differently: stride-1 ones their
            forward in the matrix form (the shift form) and their gradients as XLA's
            convolutions (``_thin_conv``), others XLA's convolution. At 131072
            positions XLA's convolution ran the 16 -> 3 channel output conv's forward
            in 8.1 ms against 2.5 for the shift form, but its gradients in 10.4 ms
            against 16.7 for the matrix form's, whose large temporaries are faulted in
            afresh on every call; with freed memory kept they took 8.1 ms, and in the
            step the matrix form beat ``_thin_conv`` in 20 of 20 rounds
            (benchmarks/README.md).

All forms use the same kernel (kh, kw, Cin, Cout) and padding, so parameters, checkpoints
and results are interchangeable (``tests/test_models.py`` checks values, gradients
and second-order gradients of every form).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sils_jax import cpu_memory
from sils_jax.models import direct_conv

IMPLS = ("auto", "xla", "matmul", "xla_pad", "winograd", "direct")
# From the per-layer sweep in benchmarks/README.md (every conv of the synthetic model
# at 64/128 px, batch 1/8): the matrix form was faster for most layers (up to 15x for
# small maps with many channels) and clearly slower only for the 3-channel output
# conv at >= 32768 positions (2-4x), on 2026-11-27; see below for the output conv now.
MATMUL_MIN_FEATURES = 8
# Re-measured 2026-12-06 for the 16 -> 3 output conv, forward + gradients, after the
# hand-written transposes (`conv_sweep.py --thin`): the matrix form was faster up to
# 65536 positions (batch 4 at 128x128: 5.2 against 11.5 ms; 32768: 2.3-3.0 against
# 5.4-8.8 ms), slower at 131072 (19.2 against 18.5 ms), where '_thin_conv' took 14.4.
MATMUL_MAX_THIN_POSITIONS = 65536
# 'winograd' (benchmarks/README.md; `conv_sweep.py --winograd`): per layer (gradients,
# and the R1 penalty's second-order gradient for the discriminators; 128x128, batch 8)
# Winograd took 0.52 and 0.62 of 'matmul''s time for the discriminators' second and
# third convs and 0.76-0.89 for the encoders' second to fourth, and lost for the
# 3-channel first convs (1.17-1.59x) and the narrowing fourth discriminator conv. In
# the step, taking it down to 256 positions (every such conv at batch 1 too) made
# batch 1 slower (1.13x); from 2048 positions batch 8 ran at 0.91-0.94 and batch 1 is
# unchanged.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_POSITIONS = 2048
# 'direct' / 'auto' with the kernels (direct_conv.strided_conv), per layer, gradients (and
# R1's second order for the discriminators), 128x128, in one process, direct / before:
# batch 8: encoder 16->32 0.87, 32->64 1.05, 64->128 0.78, 128->256 0.83; discriminator
# 32->64 0.87 (R1 0.85), 64->128 1.29 (1.26), 128->32 0.68 (0.70); batch 1: 0.53-0.96
# for every one. The two that lose are Winograd's at 2048 positions; at 8192 (the
# second convs) the kernels win against Winograd too.
DIRECT_OVER_WINOGRAD_POSITIONS = 8192


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
  if impl not in ("auto", "winograd"):
    return impl
  if impl == "auto" and jax.default_backend() != "cpu":
    return "xla"
  thin = (features < MATMUL_MIN_FEATURES and positions > MATMUL_MAX_THIN_POSITIONS
          and not cpu_memory.kept())
  return "thin" if thin else "winograd"


def _strided_direct_pays(x_shape, kernel_shape, strides, padding, *dtypes) -> bool:
  """Whether a 4x4 stride-2 conv runs as ``direct_conv.strided_conv``: where the
  kernels support it, except where Winograd pays over fewer than
  ``DIRECT_OVER_WINOGRAD_POSITIONS`` output positions (the encoders' and
  discriminators' third convs at 128x128, batch 8: Winograd's 9/16 of the products
  beat the kernels there; module doc)."""
  b, h, w, _ = x_shape
  if not all(direct_conv.supports_strided(x_shape, kernel_shape, strides, padding, d) for d in dtypes):
    return False
  positions = b * (h // 2) * (w // 2)
  return not (_winograd_pays(kernel_shape, strides, positions, dtypes[0])
              and positions < DIRECT_OVER_WINOGRAD_POSITIONS)


def takes_direct(impl: str, supported: bool) -> bool:
  """Whether a conv the direct-conv kernels support (``supported``) runs in them:
  with 'direct', and with 'auto' on the CPU backend where they built."""
  if impl not in ("auto", "direct") or (impl == "auto" and jax.default_backend() != "cpu") or not supported:
    return False
  if impl == "direct" and jax.default_backend() != "cpu":
    raise ValueError(f"config.conv_impl='direct' runs CPU kernels, but the backend is {jax.default_backend()!r} "
                     "(conv_impl='auto' picks cuDNN / XLA there)")
  if impl == "direct" and not direct_conv.available():
    raise ValueError("config.conv_impl='direct' needs the direct-conv CPU kernels, which could not be "
                     f"built or loaded: {direct_conv.unavailable_reason()} (conv_impl='auto' falls back "
                     "to XLA's forms)")
  return direct_conv.available()


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
  if takes_direct(impl, all(direct_conv.supports(kernel.shape, strides, padding, d) for d in (x.dtype, kernel.dtype))):
    return direct_conv.conv3x3(x, kernel)
  if takes_direct(impl, _strided_direct_pays(x.shape, kernel.shape, strides, padding, x.dtype, kernel.dtype)):
    return direct_conv.strided_conv(x, kernel)
  resolved = resolve_impl("winograd" if impl == "direct" else impl, b * ho * wo, cout)
  if resolved == "xla_pad":
    extra = -cin % (8 if jnp.dtype(x.dtype).itemsize == 2 else 4)
    if extra:  # zero channels in the input meet zero rows of the kernel: same sums
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    resolved = "xla"
  if resolved == "thin" and (sh, sw) == (1, 1):
    return _thin_conv(x, kernel, ((pt, pb), (pl, pr)))
  if resolved in ("xla", "thin"):
    return _xla_conv(x, kernel, tuple(strides), ((pt, pb), (pl, pr)))
  wino = resolved == "winograd" and _winograd_pays(kernel.shape, strides, b * ho * wo, x.dtype)
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


def _xla_conv(x: jax.Array, kernel: jax.Array, strides, pads) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _thin_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
  """A stride-1 conv to few channels over many positions: the forward as
  ``window_matmul`` (for the output conv, 16 -> 3 channels, the shift form), the
  gradients as XLA's convolution's (module doc, 'auto'). Same values as either."""
  kh, kw, cin, cout = kernel.shape
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  return window_matmul(xp, kernel.reshape(kh * kw * cin, cout), kh, kw, 1)


def _thin_conv_fwd(x, kernel, pads):
  return _thin_conv(x, kernel, pads), (x, kernel)


def _thin_conv_bwd(pads, res, dy):
  # differentiable again: XLA's convolutions' transposes are convolutions
  return jax.vjp(lambda x, k: _xla_conv(x, k, (1, 1), pads), *res)[1](dy)


_thin_conv.defvjp(_thin_conv_fwd, _thin_conv_bwd)


def _winograd_pays(kernel_shape: Sequence[int], strides: Sequence[int], positions: int, dtype) -> bool:
  """Whether 'winograd' runs this conv as ``winograd_2x2`` (the rule and its
  measurements: the module doc and the thresholds' comment above)."""
  kh, kw, cin, cout = kernel_shape
  return ((kh, kw) == (4, 4) and tuple(strides) == (2, 2) and cin >= WINOGRAD_MIN_CHANNELS
          and cout >= cin and positions >= WINOGRAD_MIN_POSITIONS and jnp.dtype(dtype).itemsize == 4)


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
