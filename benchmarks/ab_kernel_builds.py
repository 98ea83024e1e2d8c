"""Two builds of the direct-conv CPU kernels (sils_jax/models/direct_conv.cc) timed
against each other in one process, kernel by kernel, at the decoder's shapes
(``--family=decoder``) or the strided convs' (``--family=strided``).

  g++ -O3 -march=native -std=c++17 -shared -fPIC -w -I"$(python -c 'import jax.ffi as f; print(f.include_dir())')" \\
      sils_jax/models/direct_conv.cc -o /tmp/new.so
  python benchmarks/ab_kernel_builds.py --a=/tmp/old.so --b=/tmp/new.so --batch=8 --rounds=10

Both libraries are registered under their own FFI names; every kernel (the output conv's
forward, input and weight gradients at 128x128, 16 -> 3 channels; the up-convs' at 64,
32 and 16 px input, 32 -> 16, 64 -> 16 and 128 -> 32 channels; with --family=strided the
4x4 stride-2 convs' of the synthetic model at 128x128: the first convs 3 -> 16 / 32, and
16 -> 32, 32 -> 64, 64 -> 128, 128 -> 256, 128 -> 32) runs alternately from A
and B, ``--rounds`` rounds of 5 calls each, A first in even rounds. One JSON line per
kernel: median ms of A and B, B / A (< 1: B faster) and the largest relative difference
of their outputs (0 for the same sums in the same order). This is how kernel changes
were measured: separate processes on this machine drift by more than the changes.
"""

import argparse
import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sils_jax import cpu_memory  # noqa: E402

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--a", required=True, help="shared library A (the baseline)")
  p.add_argument("--b", required=True, help="shared library B")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--family", choices=("decoder", "strided"), default="decoder",
                 help="the decoder's output conv and up-convs, or the 4x4 stride-2 convs")
  args = p.parse_args()
  cpu_memory.keep_freed_memory()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sils_jax.models import direct_conv
  libs = []  # kept loaded
  for tag, path in (("A", args.a), ("B", args.b)):
    libs.append(ctypes.CDLL(os.path.abspath(path)))
    direct_conv.register(libs[-1], f"ab_{tag}")
  rng = np.random.default_rng(0)
  rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  b = args.batch
  cases = []
  if args.family == "decoder":
    x, w, dy = rand(b, 128, 128, 16), rand(3, 3, 16, 3), rand(b, 128, 128, 3)
    cases += [("out", "fwd", (x, w), dy.shape), ("out", "dx", (dy, w), x.shape), ("out", "dw", (x, dy), w.shape)]
    for h, c, f in [(64, 32, 16), (32, 64, 16), (16, 128, 32)]:
      x, k, dz = rand(b, h, h, c), rand(2, 2, c, 2, 2, f), rand(b, 2 * h, 2 * h, f)
      cases += [(f"up{h}", "up_fwd", (x, k), dz.shape), (f"up{h}", "up_dx", (dz, k), x.shape),
                (f"up{h}", "up_dw", (x, dz), k.shape)]
  else:
    for h, c, f in [(128, 3, 16), (128, 3, 32), (64, 16, 32), (64, 32, 64), (16, 64, 128), (8, 128, 256),
                    (16, 128, 32)]:
      x, w, dy = rand(b, h, h, c), rand(4, 4, c, f), rand(b, h // 2, h // 2, f)
      layer = f"s2_{h}_{c}to{f}"
      cases += [(layer, "s2_fwd", (x, w), dy.shape), (layer, "s2_dx", (dy, w), x.shape),
                (layer, "s2_dw", (x, dy), w.shape)]
  runs = {}
  for layer, kernel, operands, shape in cases:
    for tag in "AB":
      fn = jax.jit(lambda *a, t=f"ab_{tag}_{kernel}", s=shape: jax.ffi.ffi_call(t, jax.ShapeDtypeStruct(s, jnp.float32))(*a))
      runs[(layer, kernel, tag)] = (fn, operands, jax.block_until_ready(fn(*operands)))
  cpu_memory.use_huge_pages()
  ms = {key: [] for key in runs}
  for rnd in range(args.rounds):
    for layer, kernel, _, _ in cases:
      for tag in ("AB" if rnd % 2 == 0 else "BA"):
        fn, operands, _ = runs[(layer, kernel, tag)]
        times = []
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*operands))
          times.append(time.perf_counter() - t0)
        ms[(layer, kernel, tag)].append(float(np.median(times)) * 1e3)
  for layer, kernel, _, _ in cases:
    a, bb = (float(np.median(ms[(layer, kernel, t)])) for t in "AB")
    out_a, out_b = runs[(layer, kernel, "A")][2], runs[(layer, kernel, "B")][2]
    diff = float(jnp.max(jnp.abs(out_a - out_b)) / jnp.maximum(jnp.max(jnp.abs(out_a)), 1e-30))
    print(json.dumps({"layer": layer, "kernel": kernel, "batch": b, "a_ms": round(a, 3), "b_ms": round(bb, 3),
                      "b_over_a": round(bb / a, 3), "max_rel_diff": float(f"{diff:.2g}")}), flush=True)


if __name__ == "__main__":
  main()
