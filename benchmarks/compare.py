"""JAX/PyTorch ratio of the training step, both measured in this one run on this machine.

  python benchmarks/compare.py --image_size=128 --batch=1,8 [--steps=20] [--device=cpu|cuda]

Runs `benchmarks/train_step.py` (JAX) and `benchmarks/torch_reference.py` (PyTorch,
eager, its default up-conv: torch's own ConvTranspose2d) one after the other, each in
its own process so they never share the cores, for every batch size. Prints their JSON
lines, then one summary line per JAX line with `ratio = jax img/s / torch img/s`
(> 1: JAX is faster) against the torch eager line of the same device kind, image size,
batch and dtype (JAX `--dtype=bfloat16` pairs with torch `--autocast=bf16`). It can also
read lines saved earlier: --from_file=bench.jsonl.

--repeats=N alternates the two N times (JAX, torch, JAX, torch, ...), each row tagged
with its `repeat`: on a small CPU one process can run 10-25% faster or slower than the
next, so one pair cannot show which is faster. Each JAX row pairs with the torch row of
its own repeat, and a `jax_vs_torch_repeats` line gives the ratios' median, min and max.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cmd: list[str]) -> list[dict]:
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not rows:
    sys.exit(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return rows


def summarise(rows: list[dict]) -> list[dict]:
  """One line per JAX row (device kind, image size, batch, dtype, config label) that has
  a torch eager row of the same device kind, size, batch and dtype (torch bfloat16:
  --autocast=bf16)."""
  def key(r):
    dev = "cpu" if r["device"] in ("cpu", "cpu:cpu") else "gpu"
    return dev, r["image_size"], r["batch"], r.get("dtype", "float32"), r.get("repeat", 0)
  torch_rows = {key(r): r for r in rows if r.get("framework") == "torch" and r.get("mode") == "eager"
                and "error" not in r}
  out = []
  for j in rows:
    if j.get("framework") != "jax" or key(j) not in torch_rows:
      continue
    k, t = key(j), torch_rows[key(j)]
    out.append({"summary": "jax_vs_torch", "device": j["device"], "torch_device": t["device"],
                "config": j.get("config", ""), "image_size": k[1], "batch": k[2], "dtype": k[3],
                **({"repeat": k[4]} if "repeat" in j else {}),
                "jax_img_per_s": j["img_per_s"], "torch_img_per_s": round(t["img_per_s"], 3),
                "ratio": round(j["img_per_s"] / t["img_per_s"], 3)})
  return out


def summarise_repeats(pairs: list[dict]) -> list[dict]:
  """For pairs of ``summarise`` that come from several repeats of one setting (device,
  config, image size, batch, dtype): the ratios in repeat order, their median, min, max."""
  groups: dict[tuple, list[dict]] = {}
  for s in pairs:
    if "repeat" in s:
      groups.setdefault((s["device"], s["config"], s["image_size"], s["batch"], s["dtype"]), []).append(s)
  out = []
  for (device, config, size, batch, dtype), group in groups.items():
    if len(group) < 2:
      continue
    ratios = [s["ratio"] for s in sorted(group, key=lambda s: s["repeat"])]
    out.append({"summary": "jax_vs_torch_repeats", "device": device, "config": config,
                "image_size": size, "batch": batch, "dtype": dtype, "repeats": len(ratios),
                "ratios": ratios, "ratio_median": round(statistics.median(ratios), 3),
                "ratio_min": min(ratios), "ratio_max": max(ratios)})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--device", default="cpu", help="torch device (JAX uses its default backend)")
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--repeats", type=int, default=1, help="alternate JAX and torch this many times")
  p.add_argument("--from_file", help="summarise JSON lines saved earlier instead of measuring")
  args = p.parse_args()
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.from_file:
    with open(args.from_file) as f:
      rows = [json.loads(l) for l in f if l.startswith("{")]
  else:
    rows = []
    for b in args.batch.split(","):
      for i in range(args.repeats):
        pair = _run([sys.executable, os.path.join(HERE, "train_step.py"), f"--config={args.config}",
                     f"--batch={b}", f"--image_size={args.image_size}", f"--steps={args.steps}"])
        pair += _run([sys.executable, os.path.join(HERE, "torch_reference.py"), f"--device={args.device}",
                      f"--image_size={args.image_size}", f"--batch={b}", f"--steps={args.steps}"])
        for r in pair:
          if args.repeats > 1:
            r["repeat"] = i
          print(json.dumps(r), flush=True)
        rows += pair
  pairs = summarise(rows)
  for s in pairs + summarise_repeats(pairs):
    print(json.dumps(s))


if __name__ == "__main__":
  main()
