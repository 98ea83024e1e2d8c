"""Per-layer timing of every convolution of the synthetic model, forward + backward,
conv_impl xla vs matmul (sils_jax/models/conv.py), at 128/64 px and batch 1/8.

  python benchmarks/conv_sweep.py > benchmarks/results/cpu_conv_sweep.jsonl
  python benchmarks/conv_sweep.py --pieces --batch=8 > benchmarks/results/cpu_conv_pieces.jsonl

One JSON line per layer: kind (enc, sub = sub-pixel up-conv, out, d = discriminator),
input size h, channels, output positions M, ms for each form and their ratio
(xla / matmul: > 1 means the matrix form is faster). The rule of conv_impl=auto was
read off these lines (2-core CPU, 2026-11-27: results/cpu_conv_sweep_2026-11-27.jsonl).

``--pieces``: at 128 px and ``--batch``, the forward, the input gradient (dx) and the
weight gradient (dw) timed apart for each form, with the up-convs in the 'phases' form
(a 2x2 'VALID' conv of the 1-padded input to 4F channels;
results/cpu_conv_pieces_2026-11-27.jsonl).

``--winograd``: every 4x4 stride-2 conv at 128 px and ``--batch``, 'matmul' against
Winograd's F(2x2, 2x2) (conv_impl='winograd' with its rule overridden, so that every
such layer takes it; ``rule`` says whether the rule takes it), timed alternately
(``--repeats`` rounds, medians): the gradients of a loss for the encoders' convs, and
for the discriminators' also the R1 penalty's second-order gradient, as the step
computes them. The thresholds of ``conv._winograd_pays`` were read off these lines
and checked in the step (results/cpu_winograd_layers_2026-11-28.jsonl).

``--direct``: the decoder's up-convs (phase form) and output conv, and the first convs
(3 input channels), at 128 px and ``--batch``, the direct-conv kernels
(sils_jax/models/direct_conv.py) against XLA's matrix forms, forward and gradients apart
(results/cpu_direct_layers_b8_2026-12-07.jsonl; with the first convs
results/cpu_direct_layers_b{1,8}_2026-12-07b.jsonl).

``--thin``: the decoder's output conv (3x3, 16 -> 3 channels) over 16384 to 131072
positions, forward and gradients timed apart for XLA's convolution, 'matmul' and
``conv._thin_conv`` (the matrix form's forward with XLA's gradients), alternately;
``rule`` is what 'auto' resolves to on the CPU ("thin": ``_thin_conv``).
``conv.MATMUL_MAX_THIN_POSITIONS`` was read off these lines
(results/cpu_thin_conv_2026-12-06.jsonl).
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sils_jax.models.conv import conv2d  # noqa: E402


def timed(fn, *args, n=5):
  """Median ms of ``fn(*args)`` over n calls, after one untimed call (compilation)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def bench(impl, x, w, strides, n=10):
  loss = lambda x, w: jnp.sum(conv2d(x, w, strides, "SAME", impl) ** 2)
  return timed(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w, n=n)


def layers(size):
  """(kind, input size, Cin, Cout, kernel, stride) of every conv of the synthetic model."""
  out, h = [], size
  for cin, cout in [(3, 16), (16, 32), (32, 64), (64, 128), (128, 256)]:
    out.append(("enc", h, cin, cout, 4, 2))
    h //= 2
  h = size // 32
  for cin, cout in [(256, 512), (256, 256), (128, 128), (64, 64), (32, 64)]:  # sub-pixel: 4F outputs
    out.append(("sub", h, cin, cout, 3, 1))
    h *= 2
  out.append(("out", size, 16, 3, 3, 1))
  h = size
  for cin, cout in [(3, 32), (32, 64), (64, 128), (128, 32)]:
    out.append(("d", h, cin, cout, 4, 2))
    h //= 2
  return out


def phase_layers(size):
  """Like layers(), with the up-convs as the 'phases' form runs them: 2x2 VALID convs of
  the 1-padded input to 4F channels. (kind, input size, Cin, Cout, kernel, stride, padding)."""
  out = [l + ("SAME",) for l in layers(size) if l[0] != "sub"]
  h = size // 32
  for cin, f in [(256, 128), (256, 64), (128, 32), (64, 16), (32, 16)]:
    out.insert(-5, ("up", h + 2, cin, 4 * f, 2, 1, "VALID"))
    h *= 2
  return out


def pieces(batch):
  rng = np.random.default_rng(0)
  for kind, h, cin, cout, k, s, pad in phase_layers(128):
    x = jnp.asarray(rng.random((batch, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.random((k, k, cin, cout)) * 0.1, jnp.float32)
    row = dict(S=128, B=batch, kind=kind, h=h, cin=cin, cout=cout, k=k)
    for impl in ("xla", "matmul"):
      f = lambda x, w, impl=impl: conv2d(x, w, (s, s), pad, impl)
      dy = jnp.asarray(rng.random(jax.eval_shape(f, x, w).shape), jnp.float32)
      row["fwd_" + impl] = round(timed(jax.jit(f), x, w), 2)
      dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0])
      dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0])
      row["dx_" + impl] = round(timed(dx, x, w, dy), 2)
      row["dw_" + impl] = round(timed(dw, x, w, dy), 2)
    print(json.dumps(row), flush=True)


def winograd_layers(batch, repeats):
  from sils_jax.models import conv
  rule = conv._winograd_pays
  conv._winograd_pays = lambda *args: True  # every layer here, to measure where the rule draws the line
  rng = np.random.default_rng(0)
  for kind, h, cin, cout, k, s in layers(128):
    if (k, s) != (4, 2):
      continue
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)
    fns = {}
    for impl in ("matmul", "winograd"):
      loss = lambda x, w, impl=impl: jnp.sum(jnp.sin(conv2d(x, w, (s, s), "SAME", impl)))
      grads = jax.grad(loss, (0, 1))
      if kind == "d":  # and R1's: the gradient of |dL/dx|^2
        r1 = jax.grad(lambda x, w, loss=loss: jnp.sum(jax.grad(loss)(x, w) ** 2), (0, 1))
        fns[impl] = jax.jit(lambda x, w, grads=grads, r1=r1: (grads(x, w), r1(x, w)))
      else:
        fns[impl] = jax.jit(grads)
    outs = {impl: jax.tree.leaves(f(x, w)) for impl, f in fns.items()}
    err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(outs["matmul"], outs["winograd"]))
    times = {impl: [] for impl in fns}
    for _ in range(repeats):
      for impl, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times[impl].append((time.perf_counter() - t) * 1e3)
    med = {impl: float(np.median(v)) for impl, v in times.items()}
    used = rule((k, k, cin, cout), (s, s), batch * (h // s) ** 2, jnp.float32)
    print(json.dumps(dict(S=128, B=batch, kind=kind, h=h, cin=cin, cout=cout, M=batch * (h // s) ** 2,
                          r1=kind == "d", matmul_ms=round(med["matmul"], 2), winograd_ms=round(med["winograd"], 2),
                          ratio=round(med["winograd"] / med["matmul"], 2), rule=used,
                          max_rel_diff=float(f"{err:.2g}"))), flush=True)


def fwd_grad_medians(forms: dict, x, w, dy, repeats: int) -> dict:
  """Each form's forward and gradients (both inputs' VJP of ``dy``) timed apart, every
  form in turn for ``repeats`` rounds after one untimed call: {'fwd_NAME': median ms,
  'grad_NAME': median ms}."""
  fns = {name: (jax.jit(f), jax.jit(lambda x, w, dy, f=f: jax.vjp(f, x, w)[1](dy))) for name, f in forms.items()}
  times = {(name, piece): [] for name in fns for piece in ("fwd", "grad")}
  for name, (fwd, grad) in fns.items():
    jax.block_until_ready((fwd(x, w), grad(x, w, dy)))
  for _ in range(repeats):
    for name, (fwd, grad) in fns.items():
      for piece, fn, args in (("fwd", fwd, (x, w)), ("grad", grad, (x, w, dy))):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[(name, piece)].append((time.perf_counter() - t) * 1e3)
  return {f"{piece}_{name}": round(float(np.median(v)), 2) for (name, piece), v in times.items()}


def thin_layers(repeats):
  """The output conv (3x3, 16 -> 3 channels) over 16384 to 131072 positions: forward and
  gradients (both inputs' VJP) timed apart for XLA's convolution, the matrix form and
  '_thin_conv' (the matrix form's forward, XLA's gradients), alternately; medians."""
  from sils_jax.models import conv
  rng = np.random.default_rng(0)
  for size, batch in [(128, 1), (64, 8), (128, 2), (128, 4), (128, 8)]:
    x = jnp.asarray(rng.standard_normal((batch, size, size, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 3)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    forms = {"xla": lambda x, w: conv2d(x, w, (1, 1), "SAME", "xla"),
             "matmul": lambda x, w: conv2d(x, w, (1, 1), "SAME", "matmul"),
             "thin": lambda x, w: conv._thin_conv(x, w, ((1, 1), (1, 1)))}
    row = dict(S=size, B=batch, M=batch * size * size, rule=conv.resolve_impl("auto", batch * size * size, 3))
    print(json.dumps({**row, **fwd_grad_medians(forms, x, w, dy, repeats)}), flush=True)


def direct_layers(batch, repeats):
  """The decoder's output conv and up-convs, and the encoders' and discriminators' first
  convs (4x4 stride 2, 3 -> 16 / 32 channels) at 128 px and ``batch``: the direct-conv
  kernels (conv_impl='direct') against XLA's matrix forms ('winograd'), forward and
  gradients (both inputs' VJP) timed apart, alternately; medians; ``direct`` says
  whether the kernels take the layer."""
  from sils_jax.models import direct_conv
  from sils_jax.models.upsample import phase_conv_transpose
  if not direct_conv.available():
    raise SystemExit(f"direct-conv kernels unavailable: {direct_conv.unavailable_reason()}")
  rng = np.random.default_rng(0)
  cases = [("up", 128 // 32 * 2 ** i, cin, f) for i, (cin, f) in
           enumerate([(256, 128), (256, 64), (128, 32), (64, 16), (32, 16)])] + [("out", 128, 16, 3)]
  cases += [("first", 128, 3, 16), ("first", 128, 3, 32)]
  for kind, h, cin, f in cases:
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
    if kind == "up":
      w = jnp.asarray(rng.standard_normal((4, 4, cin, f)) * 0.1, jnp.float32)
      forms = {impl: (lambda x, w, impl=impl: phase_conv_transpose(x, w, impl)) for impl in ("winograd", "direct")}
      takes = direct_conv.supports_up(cin, f, x.dtype)
    elif kind == "out":
      w = jnp.asarray(rng.standard_normal((3, 3, cin, f)) * 0.1, jnp.float32)
      forms = {impl: (lambda x, w, impl=impl: conv2d(x, w, (1, 1), "SAME", impl)) for impl in ("winograd", "direct")}
      takes = direct_conv.supports(w.shape, (1, 1), "SAME", x.dtype)
    else:
      w = jnp.asarray(rng.standard_normal((4, 4, cin, f)) * 0.1, jnp.float32)
      forms = {impl: (lambda x, w, impl=impl: conv2d(x, w, (2, 2), "SAME", impl)) for impl in ("winograd", "direct")}
      takes = direct_conv.supports_strided(x.shape, w.shape, (2, 2), "SAME", x.dtype)
    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(forms["winograd"], x, w).shape), jnp.float32)
    row = dict(S=128, B=batch, kind=kind, h=h, cin=cin, cout=f, direct=takes)
    print(json.dumps({**row, **fwd_grad_medians(forms, x, w, dy, repeats)}), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--pieces", action="store_true", help="forward, dx and dw apart, 128 px, phases up-convs")
  p.add_argument("--winograd", action="store_true", help="4x4 stride-2 convs: matmul vs Winograd, 128 px")
  p.add_argument("--thin", action="store_true", help="the output conv over 16384-131072 positions: "
                 "XLA, matmul and the thin form, forward and gradients apart")
  p.add_argument("--direct", action="store_true", help="the decoder's up-convs and output conv and the first convs at 128 px: "
                 "the direct-conv kernels against XLA's matrix forms, forward and gradients apart")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=9, help="--winograd, --thin, --direct: alternating timed calls per form")
  args = p.parse_args()
  if args.pieces:
    return pieces(args.batch)
  if args.winograd:
    return winograd_layers(args.batch, args.repeats)
  if args.thin:
    return thin_layers(args.repeats)
  if args.direct:
    return direct_layers(args.batch, args.repeats)
  rng = np.random.default_rng(0)
  for size, batch in [(128, 1), (128, 8), (64, 1), (64, 8)]:
    for kind, h, cin, cout, k, s in layers(size):
      x = jnp.asarray(rng.random((batch, h, h, cin)), jnp.float32)
      w = jnp.asarray(rng.random((k, k, cin, cout)) * 0.1, jnp.float32)
      a, b = bench("xla", x, w, (s, s)), bench("matmul", x, w, (s, s))
      print(json.dumps(dict(S=size, B=batch, kind=kind, h=h, cin=cin, cout=cout, M=batch * (h // s) ** 2,
                            xla=round(a, 2), mm=round(b, 2), ratio=round(a / b, 2))), flush=True)


if __name__ == "__main__":
  main()
