"""Evaluate a trained run on its dataset's test split.

  python -m sils_jax.evaluate --workdir=RUN [--checkpoint_step=N] [--split=test]

Writes RUN/eval/metrics.json (per layer: MSE, MSE x100, LMSE, PSNR, SSIM and the
image count, for the model and the trivial baselines), RUN/eval/metrics.md, a
Markdown table in the layout of the paper's Fig. 3c / Table 1, and
RUN/eval/examples.png (rows: x, each predicted layer, each true layer, re-blend).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from sils_jax.image_grid import save_png, separation_grid
from sils_jax.logs import quiet_libraries

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to evaluate (default: latest).")
flags.DEFINE_enum("split", "test", ["test"], "Split with ground-truth layers (the train split is unpaired).")
flags.DEFINE_integer("num_images", None, "Evaluate only the first N test images (default: all).")
flags.DEFINE_integer("batch_size", 50, "Images per forward pass.")
flags.DEFINE_integer("num_examples", 6, "Test images shown in RUN/eval/examples.png (0: none).")

METRICS = ("mse", "lmse", "psnr", "ssim")


def _scores(pred: np.ndarray, true: np.ndarray, names, mask=None) -> dict:
  from sils_jax import metrics
  per = metrics.per_layer_metrics(pred, true, names, mask=mask, which=METRICS)
  out = {}
  for name in names:
    row = {k: float(v) for k, v in per[name].items()}
    row["mse100"] = row["mse"] * 100
    row["count"] = int(len(true))
    out[name] = row
  return out


def evaluate(separator, *, num_images: int | None = None, batch_size: int = 50,
             num_examples: int = 6) -> tuple[dict, np.ndarray | None]:
  """Scores the separator on the test triplets of its run's dataset, with baselines.

  Returns (metrics, an example grid: rows x, each predicted layer, each true layer,
  the re-blend; columns the first ``num_examples`` test images).
  """
  data = separator.test_data(num_images)
  x, true, mask = data["x"], data["layers"], data.get("mask")  # masks (MIT): LMSE only
  if len(x) == 0:
    raise ValueError(f"dataset {separator.config.dataset!r} of this run has no test triplets to score "
                     "(image_folders: retrain with config.test_folder naming a folder of triplets)")
  names = separator.layer_names
  preds, start = [], time.time()
  for i in range(0, len(x), batch_size):
    preds.append(separator.separate_batch(x[i:i + batch_size]))
    done = min(i + batch_size, len(x))
    logging.info("separated %d/%d test images (%.1f s)", done, len(x), time.time() - start)
  pred = np.concatenate(preds)
  n = len(names)
  k = min(num_examples, len(x))
  examples = None
  if k:
    recomposed = np.stack([separator.recompose({nm: pred[i, j] for j, nm in enumerate(names)})
                           for i in range(k)])
    examples = separation_grid(x[:k], pred[:k], true[:k], recomposed)
  result = {
      "step": separator.step,
      "split": "test",
      "num_images": int(len(x)),
      "layers": _scores(pred, true, names, mask),
      "baselines": {
          "x_over_n": _scores(np.repeat(x[:, None] / n, n, axis=1), true, names, mask),
          "zero": _scores(np.zeros_like(true), true, names, mask),
      },
  }
  if separator.config.dataset == "mit_intrinsic":  # Table 1's "LMSE total"
    from sils_jax import metrics
    result["mit_lmse_total"] = float(metrics.mit_lmse(true[:, 0], pred[:, 0], true[:, 1], pred[:, 1], mask))
  return result, examples


def markdown(result: dict, names) -> str:
  n = len(names)
  rows = [("ours (step %d)" % result["step"], result["layers"]),
          (f"each layer = x/{n}", result["baselines"]["x_over_n"]),
          ("each layer = 0", result["baselines"]["zero"])]
  lines = [f"Test split, {result['num_images']} images. MSE x100 per layer (as in the paper's Fig. 3c):", "",
           "| method | " + " | ".join(names) + " | avg. |", "|---" * (n + 2) + "|"]
  for label, s in rows:
    vals = [s[k]["mse100"] for k in names]
    lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
  if "mit_lmse_total" in result:
    lines += ["", f"MIT LMSE total (Table 1, 0.5 albedo + 0.5 shading, gray): {result['mit_lmse_total']:.4f}"]
  lines += ["", "All metrics (LMSE: Grosse et al. 2009, windows 20/10; PSNR/SSIM: Gaussian 11, σ 1.5, "
            "range 1):", "", "| method | layer | MSE x100 | LMSE | PSNR | SSIM | images |",
            "|---|---|---|---|---|---|---|"]
  for label, s in rows:
    for k in names:
      r = s[k]
      lines.append(f"| {label} | {k} | {r['mse100']:.3f} | {r['lmse']:.4f} | {r['psnr']:.2f} | "
                   f"{r['ssim']:.4f} | {r['count']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_libraries()
  from sils_jax.inference import Separator
  try:
    separator = Separator.from_workdir(FLAGS.workdir, FLAGS.checkpoint_step)
    result, examples = evaluate(separator, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size,
                                num_examples=FLAGS.num_examples)
  except (FileNotFoundError, ValueError) as e:  # no run, no checkpoint, no test data (DataError too)
    sys.exit(f"error: {e}")
  out_dir = os.path.join(FLAGS.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  if examples is not None:
    save_png(os.path.join(out_dir, "examples.png"), examples)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = markdown(result, separator.layer_names)
  with open(os.path.join(out_dir, "metrics.md"), "w") as f:
    f.write(table)
  print(table)
  logging.info("wrote %s/metrics.json and metrics.md", out_dir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
