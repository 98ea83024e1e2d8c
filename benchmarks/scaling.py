"""Training-step throughput against device count (weak scaling: per-device batch fixed).

  python benchmarks/scaling.py [--devices=1,2,4,8] [--per_device_batch=1] [--image_size=64]

Each device count runs `benchmarks/train_step.py` in its own process. On a CPU host
the devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count=N) and share
the same cores, so this measures the correctness and the overhead of the pmapped step
(ideal: img/s stays flat as N grows), not a speed-up. On a multi-GPU host it uses
the first N real devices (CUDA_VISIBLE_DEVICES) and efficiency is
img/s(N) / (N * img/s(1)). Prints train_step.py's JSON lines plus one summary line.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--per_device_batch", type=int, default=1)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  args = p.parse_args()
  rows = []
  for n in (int(v) for v in args.devices.split(",")):
    env = dict(os.environ)
    if args.platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    else:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), f"--config={args.config}",
           f"--batch={n * args.per_device_batch}", f"--image_size={args.image_size}", f"--steps={args.steps}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
      sys.exit(f"{n} devices: {' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    if lines[0]["device_count"] != n:
      sys.exit(f"asked for {n} devices, the step ran on {lines[0]['device_count']}")
    print(json.dumps(lines[0]), flush=True)
    rows.append(lines[0])
  base = rows[0]["img_per_s"] / rows[0]["device_count"]
  print(json.dumps({"summary": "scaling", "platform": args.platform,
                    "per_device_batch": args.per_device_batch, "image_size": args.image_size,
                    "img_per_s": {r["device_count"]: r["img_per_s"] for r in rows},
                    "efficiency": {r["device_count"]: round(r["img_per_s"] / (base * r["device_count"]), 3)
                                   for r in rows}}))


if __name__ == "__main__":
  main()
