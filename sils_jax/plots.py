"""Figures of the paper from a run's files: the SS distance curve, latent space, training curves.

    python -m sils_jax.plots --workdir=RUN [--what=curves,ss_curve,latent]
                             [--latent_method=pca|tsne] [--num_images=200]

writes into ``RUN/plots/``:

* ``ss_curve.png`` -- Fig. 3b top: ``loss = 1 - d_psi`` of eq. (6) against the
  distance ``|a - b|`` for several alpha (the run's alpha drawn bold).
* ``training_curves.png`` -- generator and discriminator loss terms from
  ``train_metrics.jsonl`` and test MSE x100 per layer from ``eval_metrics.jsonl``,
  with the trivial baselines of ``baselines.json`` as horizontal lines.
* ``latent_pca.png`` / ``latent_tsne.png`` -- Fig. 7: the latent codes
  ``E_k(x)`` and ``E_k(layer k)`` of every stream k on test images, projected
  jointly to 2-D. Encoders that separate well put ``E_k(x)`` and ``E_k(layer k)``
  in one cluster per k, the clusters of different k far apart.

Every plotting function takes arrays or files, writes one PNG and returns its path.
Projections and cluster statistics are pure numpy functions. matplotlib (Agg
backend) is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

PLOTS_DIR = "plots"
TRAIN_FILE = "train_metrics.jsonl"
EVAL_FILE = "eval_metrics.jsonl"
BASELINES_FILE = "baselines.json"

# Loss terms drawn in the two loss panels, in this order, when a run logged them.
GENERATOR_KEYS = ("g_total", "ss", "ss_inter", "gan_g", "cc", "cc_x")
DISCRIMINATOR_KEYS = ("d_total", "gan_d", "r1")

_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> str:
  plt = _pyplot()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


# --------------------------------------------------------------------- SS curve


def ss_curve_default_max_distance(alphas: Sequence[float]) -> float:
  """A distance where every curve ``1 - d_psi`` has fallen below ~0.007.

  ``1 - d_psi = sigmoid(-(d - alpha e^alpha) / alpha^2)`` is below sigmoid(-5) ~ 0.0067
  once ``d >= alpha e^alpha + 5 alpha^2``.
  """
  return max(a * math.exp(a) + 5.0 * a * a for a in alphas)


def plot_ss_curve(path: str, alphas: Sequence[float] = (1.0, 1.4, 2.0, 2.5),
                  max_distance: Optional[float] = None,
                  highlight_alpha: Optional[float] = None, num_points: int = 400) -> str:
  """Fig. 3b top: ``loss = 1 - d_psi(a, b)`` of eq. (6) against ``|a - b|``, one curve per alpha.

      d_psi = 1 / (1 + e^g),   g = -(|a - b| - alpha e^alpha) / alpha^2          (6)

  The loss is 0.5 where ``|a - b| = alpha e^alpha``; that point is marked on every curve.

  Args:
    path: PNG file to write (its folder is created).
    alphas: the alpha values to draw, each > 0.
    max_distance: right end of the distance axis; by default far enough for every
      curve to reach ~0 (see ``ss_curve_default_max_distance``).
    highlight_alpha: an alpha drawn bold and labelled "(this run)", e.g. the run's
      ``config.alpha``; added to ``alphas`` if absent.
    num_points: samples along the distance axis.

  Returns:
    ``path``.
  """
  from sils_jax.losses import ss_distance  # pylint: disable=import-outside-toplevel

  alphas = [float(a) for a in alphas]
  if highlight_alpha is not None and not any(math.isclose(a, highlight_alpha) for a in alphas):
    alphas.append(float(highlight_alpha))
  if not alphas:
    raise ValueError("alphas must hold at least one value")
  bad = [a for a in alphas if not a > 0]
  if bad:
    raise ValueError(f"every alpha must be > 0 (eq. (6) divides by alpha^2), got {bad}")
  alphas = sorted(alphas)
  if max_distance is None:
    max_distance = ss_curve_default_max_distance(alphas)
  if not max_distance > 0:
    raise ValueError(f"max_distance must be > 0, got {max_distance!r}")

  dist = np.linspace(0.0, float(max_distance), num_points, dtype=np.float32)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for alpha in alphas:
    loss = 1.0 - np.asarray(ss_distance(dist, np.zeros_like(dist), alpha))
    bold = highlight_alpha is not None and math.isclose(alpha, highlight_alpha)
    mid = alpha * math.exp(alpha)
    label = f"α = {alpha:g}: 0.5 at αe^α = {mid:.3g}" + (" (this run)" if bold else "")
    (line,) = ax.plot(dist, loss, lw=2.6 if bold else 1.5, label=label)
    if mid <= max_distance:
      ax.plot([mid], [0.5], "o", color=line.get_color(), ms=5)
  ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
  ax.set_xlim(0.0, float(max_distance))
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("distance |a − b|")
  ax.set_ylabel("loss = 1 − d_ψ(a, b)")
  ax.set_title("Inter-latent-space distance loss, eq. (6)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


# ------------------------------------------------------------------ latent space


def _stack(codes: Mapping[str, Any]) -> Tuple[list, np.ndarray, list]:
  """dict label -> [M, ...] -> (labels, stacked [sum M, D] float64, counts)."""
  if not codes:
    raise ValueError("codes must hold at least one label")
  labels, arrays = [], []
  for label, value in codes.items():
    a = np.asarray(value, np.float64)
    if a.ndim < 1 or a.shape[0] == 0:
      raise ValueError(f"codes[{label!r}]: expected an array [M, D] with M >= 1, got shape {a.shape}")
    a = a.reshape(a.shape[0], -1)
    if arrays and a.shape[1] != arrays[0].shape[1]:
      raise ValueError(f"codes[{label!r}] has {a.shape[1]} features per code, "
                       f"codes[{labels[0]!r}] has {arrays[0].shape[1]}: all codes must have the same size")
    if not np.all(np.isfinite(a)):
      raise ValueError(f"codes[{label!r}] contains NaN or inf")
    labels.append(label)
    arrays.append(a)
  return labels, np.concatenate(arrays), [len(a) for a in arrays]


def _split(labels, stacked: np.ndarray, counts) -> Dict[str, np.ndarray]:
  bounds = np.cumsum([0] + list(counts))
  return {label: stacked[bounds[i]:bounds[i + 1]] for i, label in enumerate(labels)}


def pca_basis(x: np.ndarray, num_components: int = 2) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Principal axes of the rows of ``x`` [M, D] by SVD of the centred data.

      x - mean = U S V^T;  components = first rows of V^T;  explained = S^2 / sum S^2

  Each component's sign is fixed so that its largest-magnitude entry is positive
  (the SVD's sign is arbitrary). When the rank is below ``num_components`` the
  missing components are zero.

  Returns:
    (mean [D], components [num_components, D], explained variance ratio [num_components]).
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  mean = x.mean(axis=0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  k = min(num_components, vt.shape[0])
  comps = np.zeros((num_components, x.shape[1]))
  comps[:k] = vt[:k]
  signs = np.sign(comps[np.arange(num_components), np.argmax(np.abs(comps), axis=1)])
  comps *= np.where(signs == 0, 1.0, signs)[:, None]
  var = s**2
  total = var.sum()
  ratio = np.zeros(num_components)
  ratio[:k] = var[:k] / total if total > 0 else 0.0
  return mean, comps, ratio


def pca_project(codes: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Projects all codes jointly onto their first two principal axes (Fig. 7).

  Args:
    codes: dict label -> array [M, D] (or [M, ...], flattened) of latent codes;
      every label may have its own M.

  Returns:
    dict label -> [M, 2] float64 coordinates, centred on the joint mean of all codes.
  """
  labels, stacked, counts = _stack(codes)
  mean, comps, _ = pca_basis(stacked, 2)
  return _split(labels, (stacked - mean) @ comps.T, counts)


def tsne_project(codes: Mapping[str, Any], perplexity: float = 30.0, seed: int = 0,
                 pca_dims: int = 50) -> Dict[str, np.ndarray]:
  """Projects all codes jointly to 2-D with t-SNE (scikit-learn), as the paper's Fig. 7 caption.

  The codes are first reduced to ``pca_dims`` principal components (the usual
  t-SNE preprocessing; exact below that size). ``perplexity`` is capped at
  ``(num_codes - 1) / 3`` so that small sets work.

  Raises:
    ImportError: scikit-learn is not installed.
  """
  try:
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn "
                      "(or use the 'pca' projection)") from e
  labels, stacked, counts = _stack(codes)
  n = len(stacked)
  if n < 4:
    raise ValueError(f"t-SNE needs at least 4 codes in all, got {n}")
  if stacked.shape[1] > pca_dims:
    mean, comps, _ = pca_basis(stacked, pca_dims)
    stacked = (stacked - mean) @ comps.T
  perplexity = float(min(perplexity, max((n - 1) / 3.0, 1.0)))
  out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
  return _split(labels, np.asarray(out, np.float64), counts)


def project(codes: Mapping[str, Any], method: str = "pca") -> Dict[str, np.ndarray]:
  """``pca_project`` or ``tsne_project`` by name."""
  if method == "pca":
    return pca_project(codes)
  if method == "tsne":
    return tsne_project(codes)
  raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def cluster_stats(points: Mapping[str, Any]) -> Dict[str, Any]:
  """How far apart the 2-D clusters of each label are, relative to their size.

      centroid_l = mean of the points of l
      spread_l   = mean distance of the points of l to centroid_l
      ratio(l, m) = |centroid_l - centroid_m| / ((spread_l + spread_m) / 2)

  A ratio well above 2 means two clusters that barely overlap; near 0, one cloud.

  Args:
    points: dict label -> [M, 2] (e.g. the output of ``pca_project``).

  Returns:
    ``{"centroid": {label: [2]}, "spread": {label: float},
    "ratio": {(label_a, label_b): float}}`` for every pair in the order of ``points``
    (``inf`` when both spreads are 0 and the centroids differ, 0 when both are 0 and equal).
  """
  centroid, spread = {}, {}
  for label, p in points.items():
    p = np.asarray(p, np.float64)
    centroid[label] = p.mean(axis=0)
    spread[label] = float(np.linalg.norm(p - centroid[label], axis=1).mean())
  ratio = {}
  for a, b in itertools.combinations(points, 2):
    between = float(np.linalg.norm(centroid[a] - centroid[b]))
    within = 0.5 * (spread[a] + spread[b])
    ratio[(a, b)] = between / within if within > 0 else (math.inf if between > 0 else 0.0)
  return {"centroid": centroid, "spread": spread, "ratio": ratio}


def plot_latent_space(path: str, codes: Mapping[str, Any], method: str = "pca",
                      title: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
  """Fig. 7: latent codes of several sets, projected jointly to 2-D, one colour and marker per set.

  Args:
    path: PNG file to write.
    codes: dict label -> [M, D] flattened latent codes, e.g. ``{"E_square(x)": ...,
      "E_square(square)": ..., "E_circle(x)": ..., "E_circle(circle)": ...}``.
    method: "pca" (numpy SVD on the joint, centred codes) or "tsne" (needs scikit-learn).
    title: figure title; by default names the method.

  Returns:
    (``path``, ``cluster_stats`` of the 2-D points).
  """
  if method == "pca":
    labels, stacked, _ = _stack(codes)
    _, _, explained = pca_basis(stacked, 2)
    points = pca_project(codes)
    axis_names = [f"PC{i + 1} ({100 * r:.1f}% of variance)" for i, r in enumerate(explained)]
  else:
    points = project(codes, method)
    axis_names = ["t-SNE 1", "t-SNE 2"]
  stats = cluster_stats(points)

  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 5.0))
  colors = plt.get_cmap("tab10").colors
  for i, (label, p) in enumerate(points.items()):
    color, marker = colors[i % len(colors)], _MARKERS[i % len(_MARKERS)]
    ax.scatter(p[:, 0], p[:, 1], s=12, alpha=0.6, color=color, marker=marker,
               label=f"{label} (n={len(p)})", linewidths=0)
    c = stats["centroid"][label]
    ax.scatter([c[0]], [c[1]], s=90, color=color, marker=marker, edgecolors="k", linewidths=1.0)
  ax.set_xlabel(axis_names[0])
  ax.set_ylabel(axis_names[1])
  ax.set_title(title or f"Latent codes, joint {'PCA' if method == 'pca' else 't-SNE'} (large markers: centroids)",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, markerscale=1.5)
  return _save(fig, path), stats


# -------------------------------------------------------------- training curves


def read_jsonl(path: str) -> list:
  """Records of a metrics file, sorted by "step"; for a repeated step the last record wins.

  A run resumed from a checkpoint logs again the steps after that checkpoint, and a
  run still training may have a half-written last line: that line is skipped.
  """
  records = []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        continue  # being written right now
      raise ValueError(f"{path}, line {i + 1}: not valid JSON: {line[:80]!r}") from None
  by_step = {}
  for r in records:
    if "step" not in r:
      raise ValueError(f"{path}: a record has no 'step' key: {r}")
    by_step[r["step"]] = r
  return [by_step[s] for s in sorted(by_step)]


def _series(records: Sequence[dict], key: str) -> Tuple[np.ndarray, np.ndarray]:
  steps = np.array([r["step"] for r in records if key in r], np.float64)
  vals = np.array([float(r[key]) for r in records if key in r], np.float64)
  return steps, vals


def _running_mean(v: np.ndarray, window: int) -> np.ndarray:
  if window <= 1 or len(v) < window:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  out = np.empty_like(v)
  out[window - 1:] = (c[window:] - c[:-window]) / window
  out[:window - 1] = c[1:window] / np.arange(1, window)
  return out


def _plot_losses(ax, records, keys, title, smooth):
  drawn, smoothed = 0, False
  for key in keys:
    steps, vals = _series(records, key)
    if not len(steps):
      continue
    window = smooth if smooth is not None else max(1, len(vals) // 50)
    if window > 1 and len(vals) >= window:
      (line,) = ax.plot(steps, vals, lw=0.6, alpha=0.25)
      ax.plot(steps, _running_mean(vals, window), lw=1.4, color=line.get_color(), label=key)
      smoothed = True
    else:
      ax.plot(steps, vals, lw=1.2, label=key, marker="." if len(vals) < 30 else None)
    drawn += 1
  ax.set_title(title + (" (faint: raw; solid: running mean)" if smoothed else ""), fontsize=9)
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=7, ncol=2)
  else:
    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")


def plot_training_curves(workdir: str, path: Optional[str] = None,
                         smooth: Optional[int] = None) -> str:
  """Loss terms and test MSE x100 against the training step, from a run's metric files.

  Panels: generator terms (``GENERATOR_KEYS``), discriminator terms
  (``DISCRIMINATOR_KEYS``) from ``WORKDIR/train_metrics.jsonl``; test MSE x100 per
  layer and their mean from ``WORKDIR/eval_metrics.jsonl`` on a log axis, with the
  trivial baselines of ``WORKDIR/baselines.json`` (dashed: every layer = x/N;
  dotted: every layer = 0) in each layer's colour. Without the eval file only the
  loss panels are drawn.

  Args:
    workdir: the run's directory.
    path: PNG to write; default ``WORKDIR/plots/training_curves.png``.
    smooth: running-mean window over logged points for the loss curves; None picks
      ``len // 50`` (raw values drawn faint behind), 1 draws raw values only.

  Returns:
    ``path``.

  Raises:
    FileNotFoundError: ``WORKDIR/train_metrics.jsonl`` does not exist.
    ValueError: the train file holds no records.
  """
  workdir = os.fspath(workdir)
  train_path = os.path.join(workdir, TRAIN_FILE)
  if not os.path.isfile(train_path):
    raise FileNotFoundError(
        f"{train_path} not found: the workdir {workdir!r} holds no training run "
        f"(python -m sils_jax.main --workdir=... writes {TRAIN_FILE} every log_every_steps)")
  train = read_jsonl(train_path)
  if not train:
    raise ValueError(f"{train_path} holds no records yet")
  eval_path = os.path.join(workdir, EVAL_FILE)
  evals = read_jsonl(eval_path) if os.path.isfile(eval_path) else []
  baselines_path = os.path.join(workdir, BASELINES_FILE)
  baselines = {}
  if os.path.isfile(baselines_path):
    with open(baselines_path) as f:
      baselines = json.load(f)
  if path is None:
    path = os.path.join(workdir, PLOTS_DIR, "training_curves.png")

  plt = _pyplot()
  ncols = 3 if evals else 2
  fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0), squeeze=False, sharex=True)
  axes = axes[0]
  _plot_losses(axes[0], train, GENERATOR_KEYS, "generator terms", smooth)
  _plot_losses(axes[1], train, DISCRIMINATOR_KEYS, "discriminator terms", smooth)
  if evals:
    ax = axes[2]
    layer_keys = list(dict.fromkeys(  # in the order the run logged them
        k for r in evals for k in r if k.startswith("mse100_") and k != "mse100_mean"))
    colors = plt.get_cmap("tab10").colors
    for i, key in enumerate(layer_keys):
      layer, color = key[len("mse100_"):], colors[i % len(colors)]
      steps, vals = _series(evals, key)
      ax.plot(steps, vals, marker="o", ms=3, lw=1.4, color=color, label=layer)
      x_over_n = baselines.get("x_over_n", {}).get(layer)
      if x_over_n is not None:
        ax.axhline(x_over_n, color=color, ls="--", lw=1.0, label=f"{layer}: x/N ({x_over_n:.3g})")
      zero = baselines.get("zero", {}).get(layer)
      if zero is not None:
        ax.axhline(zero, color=color, ls=":", lw=0.9, alpha=0.7, label=f"{layer}: zero ({zero:.3g})")
    steps, vals = _series(evals, "mse100_mean")
    if len(steps):
      ax.plot(steps, vals, color="k", lw=1.0, alpha=0.6, label="mean")
    if all(v > 0 for r in evals for k, v in r.items() if k.startswith("mse100_")):
      ax.set_yscale("log")
    last = evals[-1]
    ax.set_title(f"test MSE×100 (step {last['step']}: mean {last.get('mse100_mean', float('nan')):.3g})",
                 fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.suptitle(os.path.basename(os.path.normpath(os.path.abspath(workdir))), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


# ------------------------------------------------------------------------- CLI


def latent_codes(separator, num_images: int) -> Dict[str, np.ndarray]:
  """``{"E_k(x)": [M, D], "E_k(k)": [M, D]}`` for every stream k of a trained ``Separator``."""
  data = separator.test_data(num_images)
  from_x = separator.encode(data["x"])
  from_layers = separator.encode_layers(data["layers"])
  codes = {}
  for k, name in enumerate(separator.layer_names):
    codes[f"E_{name}(x)"] = np.asarray(from_x[k]).reshape(len(data["x"]), -1)
    codes[f"E_{name}({name})"] = np.asarray(from_layers[k]).reshape(len(data["layers"]), -1)
  return codes


def _run_alpha(workdir: str) -> Optional[float]:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return float(json.load(f)["alpha"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def main(argv):
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  workdir = FLAGS.workdir
  what = [w.strip() for w in FLAGS.what if w.strip()]
  unknown = sorted(set(what) - {"curves", "ss_curve", "latent"})
  if unknown:
    raise app.UsageError(f"--what: unknown {unknown}; choose from curves, ss_curve, latent")
  out_dir = os.path.join(workdir, PLOTS_DIR)
  if "ss_curve" in what:
    alphas = [float(a) for a in FLAGS.alphas]
    p = plot_ss_curve(os.path.join(out_dir, "ss_curve.png"), alphas, highlight_alpha=_run_alpha(workdir))
    logging.info("wrote %s", p)
  if "curves" in what:
    try:
      p = plot_training_curves(workdir, os.path.join(out_dir, "training_curves.png"))
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f"error: {e}")
    logging.info("wrote %s", p)
  if "latent" in what:
    from sils_jax.inference import Separator  # pylint: disable=import-outside-toplevel
    sep = Separator.from_workdir(workdir, step=FLAGS.step)
    codes = latent_codes(sep, FLAGS.num_images)
    p, stats = plot_latent_space(os.path.join(out_dir, f"latent_{FLAGS.latent_method}.png"), codes,
                                 FLAGS.latent_method)
    logging.info("wrote %s", p)
    for (a, b), r in stats["ratio"].items():
      logging.info("between/within distance %-22s vs %-22s %.2f", a, b, r)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "The run's directory (as given to sils_jax.main).")
  flags.DEFINE_list("what", ["curves", "ss_curve", "latent"],
                    "Figures to draw: curves, ss_curve, latent (comma-separated).")
  flags.DEFINE_enum("latent_method", "pca", ["pca", "tsne"],
                    "2-D projection of the latent codes (tsne needs scikit-learn).")
  flags.DEFINE_integer("num_images", 200, "Test images whose latent codes are plotted.")
  flags.DEFINE_integer("step", None, "Checkpoint step for --what=latent; default the latest.")
  flags.DEFINE_list("alphas", ["1.0", "1.4", "2.0", "2.5"], "Alpha values of the SS curve.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  _define_flags()
  _app.run(main)
