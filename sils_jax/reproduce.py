"""Trains and evaluates the synthetic experiments of paper Sec. 5.2-5.4 and writes a table.

  python -m sils_jax.reproduce --workdir=runs/repro [--quick] [--steps=N]
      [--experiments=full,no_ss,no_cc,supervised] [--seeds=0,1,2] [--three_layers]

Experiments (each a `python -m sils_jax.main` run, then `python -m sils_jax.evaluate`):
  full        the method with the config's (paper) settings
  no_ss       Fig. 3c ablation: λ1 = λ2 = λ3 = 0 (no self-supervision)
  no_cc       Fig. 3c ablation: λ4 = λ5 = λ6 = 0 (no cycle consistency)
  supervised  the upper bound: the same generator, L1 on paired training triplets
  remix       beside the paper: the remix term alone (Neural Egg Separation; λ0 = w1 = w2 = 0)
  ours        configs/ours.py (our method; its variants follow --quick / --three_layers)
  ratio_R     Fig. 3b bottom: (λ1 + λ2) / λ3 = R with λ3 = 1, e.g. ratio_0.1, ratio_10
  w_A_B       Fig. 4: w1 = A, w2 = B in eq. (9), with λ4 = λ5 = λ6 = 1 so that w2 is the whole
              cycle weight (the paper's best, w_1_10, is the same objective as full)
`--seeds` repeats every experiment per seed. `--set=field=value` (repeatable) adds config
overrides to every run (e.g. --set=norm=none --set='ss_levels=(1,2,3,4)'); their run
directories get `--tag` (default: made from the overrides) in their names, so they never
mix with the runs without them. `--three_layers` uses the Sec. 5.4 config
(square, circle, triangle). `--quick` uses the 64x64 quick config (a CPU-sized study,
not the paper's setting). Runs that exist are resumed, finished ones reused, so the
command can be re-run after an interruption. Writes WORKDIR/results.md and
WORKDIR/results.json (of this command's runs; `--summary` tabulates every finished run in
WORKDIR instead, training nothing): test MSE x100 per layer on the config's test set (1000 images at
paper settings), next to the x/N and zero baselines on the same images.

The runs use the config files of the source tree's ``configs/`` directory (next to the
``sils_jax`` package: a clone, or an editable install) and run in that tree; an install
without the source tree has no configs, and the command says so. ``--workdir`` is
relative to the directory the command is started in.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree: configs/, sils_jax/
PAPER = {"full": (0.289, 0.274)}  # Sec. 5.2, MSE x100 square / circle


def overrides(name: str, num_layers: int) -> list[str]:
  zeros = "(" + ",".join(["0.0"] * num_layers) + ")"
  if name == "full":
    return []
  if name == "no_ss":
    return [f"--config.lambda_intra={zeros}", "--config.lambda_inter=0.0"]
  if name == "no_cc":
    return ["--config.lambda_cycle_x=0.0", f"--config.lambda_cycle_layers={zeros}"]
  if name == "supervised":
    return ["--config.objective=supervised"]
  if name == "remix":  # the remix term alone: no GAN, SS or cycle terms (losses.remix_loss)
    return ["--config.remix_weight=1.0", "--config.lambda0=0.0", "--config.w1=0.0", "--config.w2=0.0"]
  if name == "ours":  # configs/ours.py as it is
    return []
  if name.startswith("ratio_"):
    r = float(name.split("_", 1)[1])
    each = "(" + ",".join([repr(r / num_layers)] * num_layers) + ")"
    return [f"--config.lambda_intra={each}", "--config.lambda_inter=1.0"]
  if name.startswith("w_"):
    try:
      w1, w2 = (float(v) for v in name.split("_")[1:])
    except ValueError:
      raise SystemExit(f"experiment {name!r}: expected w_<w1>_<w2>, e.g. w_1_10") from None
    ones = "(" + ",".join(["1.0"] * num_layers) + ")"
    return [f"--config.w1={w1!r}", f"--config.w2={w2!r}", "--config.lambda_cycle_x=1.0",
            f"--config.lambda_cycle_layers={ones}"]
  raise SystemExit(f"unknown experiment {name!r}: full, no_ss, no_cc, supervised, remix, ours, ratio_R or w_A_B")


def run_name(name: str, args) -> str:
  """The experiment, tagged with its --set overrides: run directories are RUN_seedS, and
  the tables (this command's and --summary's) list RUN."""
  tag = args.tag or "_".join("".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in kv).strip("-")
                             for kv in args.set)
  return f"{name}_{tag}" if tag else name


def check_configs(root: str = ROOT) -> None:
  """Exits with a message unless ``root`` holds the config this command trains with."""
  if not os.path.isfile(os.path.join(root, "configs", "synthetic.py")):
    raise SystemExit(f"sils_jax.reproduce needs the source tree's configs/synthetic.py, which is not in {root} "
                     "(sils_jax installed without its source tree?): run it from a clone of the repository, "
                     "or install that clone with `pip install -e .`")


def run(name: str, seed: int, args) -> dict:
  variant = "_".join(v for v, on in (("three_layers", args.three_layers), ("quick", args.quick)) if on)
  config = ("configs/ours.py" if name == "ours" else "configs/synthetic.py") + (f":{variant}" if variant else "")
  num_layers = 3 if args.three_layers else 2
  extra = [f"--config.{kv}" for kv in args.set]
  workdir = os.path.join(args.workdir, f"{run_name(name, args)}_seed{seed}")
  metrics_path = os.path.join(workdir, "eval", "metrics.json")
  flags = [f"--config={config}", f"--workdir={workdir}", f"--config.seed={seed}"] + overrides(name, num_layers) + extra
  if args.steps:
    flags.append(f"--config.num_train_steps={args.steps}")
  steps = args.steps
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      done = json.load(f)
    if not steps or done["step"] == steps:
      print(f"{name} seed {seed}: reusing {metrics_path} (step {done['step']})", flush=True)
      return done
  os.makedirs(workdir, exist_ok=True)
  t = time.time()
  print(f"{name} seed {seed}: training -> {workdir}/train.log", flush=True)
  with open(os.path.join(workdir, "train.log"), "a") as log:
    rc = subprocess.call([sys.executable, "-m", "sils_jax.main"] + flags, cwd=ROOT, stdout=log,
                         stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"{name} seed {seed}: training failed (exit {rc}); see {workdir}/train.log")
  train_s = time.time() - t
  with open(os.path.join(workdir, "evaluate.log"), "w") as log:
    rc = subprocess.call([sys.executable, "-m", "sils_jax.evaluate", f"--workdir={workdir}"], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"{name} seed {seed}: evaluation failed (exit {rc}); see {workdir}/evaluate.log")
  with open(metrics_path) as f:
    result = json.load(f)
  result["train_wall_s"] = round(train_s, 1)
  result["command"] = shlex.join(["python", "-m", "sils_jax.main"] + flags)
  with open(metrics_path, "w") as f:
    json.dump(result, f, indent=2)
  return result


def table(results: dict) -> str:
  first = next(iter(results.values()))[0]
  names = list(first["layers"])
  head = "| experiment | seeds | step | " + " | ".join(f"{n} MSE×100" for n in names) + " | mean |"
  lines = [head, "|" + "---|" * (len(names) + 4)]
  import numpy as np
  for exp, rs in results.items():
    per = np.array([[r["layers"][n]["mse100"] for n in names] for r in rs])
    cells = []
    for j in range(len(names)):
      col = per[:, j]
      cells.append(f"{col.mean():.3f}" + (f" ± {col.std():.3f}" if len(rs) > 1 else ""))
    mean = per.mean(1)
    lines.append(f"| {exp} | {len(rs)} | {rs[0]['step']} | " + " | ".join(cells) +
                 f" | {mean.mean():.3f}" + (f" ± {mean.std():.3f}" if len(rs) > 1 else "") + " |")
  for kind in ("x_over_n", "zero"):
    b = first["baselines"][kind]
    lines.append(f"| baseline: {kind} | – | – | " + " | ".join(f"{b[n]['mse100']:.3f}" for n in names) +
                 f" | {np.mean([b[n]['mse100'] for n in names]):.3f} |")
  if names == ["square", "circle"]:
    lines.append("| paper (Sec. 5.2), on its own data | – | – | 0.289 | 0.274 | 0.282 |")
  return "\n".join(lines)


def collect(workdir: str) -> dict:
  """Every finished run under WORKDIR (RUN_seedS/eval/metrics.json), grouped by RUN."""
  results = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*_seed*", "eval", "metrics.json"))):
    run_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
    with open(path) as f:
      results.setdefault(re.sub(r"_seed\d+$", "", run_dir), []).append(json.load(f))
  if not results:
    raise SystemExit(f"no finished runs (RUN_seedS/eval/metrics.json) under {workdir}")
  return results


def write(workdir: str, results: dict) -> str:
  md = table(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return md


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--quick", action="store_true", help="64x64 quick config (CPU-sized)")
  p.add_argument("--three_layers", action="store_true", help="Sec. 5.4: square, circle, triangle")
  p.add_argument("--steps", type=int, default=0, help="training steps (default: the config's)")
  p.add_argument("--experiments", default="full,no_ss,no_cc,supervised")
  p.add_argument("--seeds", default="0")
  p.add_argument("--set", action="append", default=[], help="extra config override for every run: field=value")
  p.add_argument("--tag", default="", help="run-directory suffix for --set runs (default: from --set)")
  p.add_argument("--summary", action="store_true",
                 help="train nothing: tabulate every finished run under --workdir (all experiments, seeds, --set tags)")
  args = p.parse_args(argv)
  args.workdir = os.path.abspath(args.workdir)  # the runs' processes work in ROOT
  if args.summary:
    print(write(args.workdir, collect(args.workdir)))
    return
  check_configs()
  results = {}
  for name in args.experiments.split(","):
    for seed in (int(s) for s in args.seeds.split(",")):
      results.setdefault(run_name(name, args), []).append(run(name, seed, args))
      md = write(args.workdir, results)
  print(md)


if __name__ == "__main__":
  main()
