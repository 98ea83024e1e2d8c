"""Tests of sils_jax.plots: PNGs are written, PCA and cluster statistics are right."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sils_jax import plots


def _assert_png(path):
  assert os.path.isfile(path)
  with Image.open(path) as im:
    assert im.format == "PNG"
    w, h = im.size
    assert w > 0 and h > 0


def _blob(rng, center, m=60, d=32, scale=1.0):
  return np.asarray(center, np.float64) + scale * rng.normal(size=(m, d))


# ---------------------------------------------------------------------- SS curve


def test_ss_curve_png(tmp_path):
  path = plots.plot_ss_curve(str(tmp_path / "sub" / "ss_curve.png"), highlight_alpha=1.4)
  assert path == str(tmp_path / "sub" / "ss_curve.png")
  _assert_png(path)


def test_ss_curve_default_range_reaches_zero():
  from sils_jax.losses import ss_distance
  alphas = (1.0, 1.4, 2.0, 2.5)
  dmax = plots.ss_curve_default_max_distance(alphas)
  assert dmax >= 2.5 * math.exp(2.5)  # every 0.5 crossing is on the axis
  for a in alphas:
    assert 1.0 - float(ss_distance(dmax, 0.0, a)) < 0.01


def test_ss_curve_rejects_bad_alpha(tmp_path):
  with pytest.raises(ValueError, match="alpha"):
    plots.plot_ss_curve(str(tmp_path / "x.png"), alphas=(1.0, 0.0))


# -------------------------------------------------------------------- latent PCA


def test_pca_separated_blobs_give_large_ratio():
  rng = np.random.default_rng(0)
  shift = np.zeros(32)
  shift[3] = 20.0
  points = plots.pca_project({"a": _blob(rng, 0.0), "b": _blob(rng, shift, m=40)})
  assert points["a"].shape == (60, 2) and points["b"].shape == (40, 2)
  stats = plots.cluster_stats(points)
  assert stats["ratio"][("a", "b")] > 5.0
  np.testing.assert_allclose(np.linalg.norm(stats["centroid"]["a"] - stats["centroid"]["b"]), 20.0, rtol=0.1)


def test_pca_identical_distributions_give_small_ratio():
  rng = np.random.default_rng(1)
  points = plots.pca_project({"a": _blob(rng, 0.0, m=200), "b": _blob(rng, 0.0, m=200)})
  assert plots.cluster_stats(points)["ratio"][("a", "b")] < 0.5


def test_pca_recovers_variance_direction():
  rng = np.random.default_rng(2)
  d = 16
  u = rng.normal(size=d)
  u /= np.linalg.norm(u)
  t = rng.normal(size=100) * 5.0
  x = 3.0 + t[:, None] * u[None, :] + 0.01 * rng.normal(size=(100, d))
  mean, comps, explained = plots.pca_basis(x, 2)
  assert abs(float(comps[0] @ u)) > 0.999
  assert explained[0] > 0.99
  proj = plots.pca_project({"all": x})["all"]
  np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)  # centred on the joint mean
  assert abs(np.corrcoef(proj[:, 0], t)[0, 1]) > 0.999
  assert proj[:, 1].std() < 0.05 * proj[:, 0].std()


def test_pca_rank_one_and_rank_zero_pad_with_zeros():
  x = np.outer(np.arange(5.0), np.ones(3))  # rank 1
  _, comps, explained = plots.pca_basis(x, 2)
  np.testing.assert_allclose(explained, [1.0, 0.0], atol=1e-12)
  proj = plots.pca_project({"a": np.ones((4, 1)), "b": np.zeros((3, 1))})  # D = 1
  assert proj["a"].shape == (4, 2)
  np.testing.assert_allclose(proj["a"][:, 1], 0.0)


def test_pca_rejects_mismatched_sizes():
  with pytest.raises(ValueError, match="same size"):
    plots.pca_project({"a": np.zeros((3, 4)), "b": np.zeros((3, 5))})


def test_plot_latent_space_png_and_stats(tmp_path):
  rng = np.random.default_rng(3)
  far = np.zeros(24)
  far[0] = 30.0
  codes = {"E_square(x)": _blob(rng, 0.0, 30, 24), "E_square(square)": _blob(rng, 0.0, 30, 24),
           "E_circle(x)": _blob(rng, far, 30, 24), "E_circle(circle)": _blob(rng, far, 30, 24)}
  path, stats = plots.plot_latent_space(str(tmp_path / "latent_pca.png"), codes)
  _assert_png(path)
  r = stats["ratio"]
  assert r[("E_square(x)", "E_circle(x)")] > 5.0
  assert r[("E_square(x)", "E_square(square)")] < 1.0
  assert set(stats["centroid"]) == set(codes)


def test_tsne_if_sklearn_available(tmp_path):
  pytest.importorskip("sklearn")
  rng = np.random.default_rng(4)
  far = np.zeros(8)
  far[0] = 50.0
  codes = {"a": _blob(rng, 0.0, 15, 8), "b": _blob(rng, far, 15, 8)}
  path, stats = plots.plot_latent_space(str(tmp_path / "latent_tsne.png"), codes, method="tsne")
  _assert_png(path)
  assert stats["ratio"][("a", "b")] > 2.0


def test_unknown_method_raises():
  with pytest.raises(ValueError, match="pca"):
    plots.project({"a": np.zeros((3, 2))}, method="umap")


# -------------------------------------------------------------- training curves


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _fake_run(workdir, with_eval=True, num_train=12):
  workdir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  train = []
  for i in range(1, num_train + 1):
    r = {k: float(rng.uniform(0.1, 2.0)) for k in
         ("g_total", "d_total", "ss", "ss_inter", "gan_g", "gan_d", "cc", "cc_x", "r1",
          "g_grad_norm", "d_grad_norm", "ss_intra_0", "cc_0", "gan_g_0", "gan_d_0")}
    r.update(step=10 * i, lr=1e-4, steps_per_s=3.0)
    train.append(r)
  _write_jsonl(workdir / plots.TRAIN_FILE, train)
  if with_eval:
    evals = [{"step": s, "mse100_square": 2.0 / (1 + s), "mse100_circle": 3.0 / (1 + s)}
             for s in (0, 40, 80, 120)]
    for e in evals:
      e["mse100_mean"] = (e["mse100_square"] + e["mse100_circle"]) / 2
    _write_jsonl(workdir / plots.EVAL_FILE, evals)
    (workdir / plots.BASELINES_FILE).write_text(json.dumps(
        {"x_over_n": {"square": 0.83, "circle": 0.83}, "zero": {"square": 1.19, "circle": 2.7}}))
  return workdir


def test_training_curves_png(tmp_path):
  run = _fake_run(tmp_path / "run")
  path = plots.plot_training_curves(str(run))
  assert path == os.path.join(str(run), "plots", "training_curves.png")
  _assert_png(path)


def test_training_curves_without_eval_and_smoothing(tmp_path):
  run = _fake_run(tmp_path / "run", with_eval=False, num_train=120)
  with open(run / plots.TRAIN_FILE, "a") as f:
    f.write('{"step": 1300, "g_to')  # a line being written while we read
  path = plots.plot_training_curves(str(run), str(tmp_path / "curves.png"))
  _assert_png(path)


def test_training_curves_missing_train_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="train_metrics.jsonl.*no training run"):
    plots.plot_training_curves(str(tmp_path))


def test_read_jsonl_sorts_and_keeps_last_of_repeated_steps(tmp_path):
  p = tmp_path / "m.jsonl"
  _write_jsonl(p, [{"step": 20, "v": 1}, {"step": 10, "v": 2}, {"step": 20, "v": 3}])
  assert plots.read_jsonl(str(p)) == [{"step": 10, "v": 2}, {"step": 20, "v": 3}]
  with open(p, "a") as f:
    f.write("garbage\n{\"step\": 30}\n")
  with pytest.raises(ValueError, match="line 4"):
    plots.read_jsonl(str(p))


# ------------------------------------------------------------------------- CLI


def test_cli_curves_and_ss_curve(tmp_path):
  run = _fake_run(tmp_path / "run")
  (run / "config.json").write_text(json.dumps({"alpha": 1.4}))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "sils_jax.plots", f"--workdir={run}",
                         "--what=curves,ss_curve"], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  _assert_png(str(run / "plots" / "ss_curve.png"))
  _assert_png(str(run / "plots" / "training_curves.png"))


class _FakeSeparator:
  """The part of sils_jax.inference.Separator that --what=latent uses."""

  layer_names = ("square", "circle")

  def test_data(self, count):
    rng = np.random.default_rng(5)
    return {"x": rng.uniform(size=(count, 8, 8, 3)).astype(np.float32),
            "layers": rng.uniform(size=(count, 2, 8, 8, 3)).astype(np.float32)}

  def encode(self, x):
    return [x.reshape(len(x), -1)[:, :6] + 10.0 * k for k in range(2)]

  def encode_layers(self, layers):
    return [layers[:, k].reshape(len(layers), -1)[:, :6] + 10.0 * k for k in range(2)]


def test_latent_codes_labels_and_shapes(tmp_path):
  codes = plots.latent_codes(_FakeSeparator(), 7)
  assert list(codes) == ["E_square(x)", "E_square(square)", "E_circle(x)", "E_circle(circle)"]
  assert all(v.shape == (7, 6) for v in codes.values())
  _, stats = plots.plot_latent_space(str(tmp_path / "l.png"), codes)
  assert stats["ratio"][("E_square(x)", "E_circle(x)")] > 5.0
