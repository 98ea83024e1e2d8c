"""The Python API (Separator), `sils_jax.separate` and `sils_jax.evaluate` on a tiny trained run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sils_jax.inference import Separator, to_float_rgb
from sils_jax.training import loop
from tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def separator(run_dir):
  return Separator.from_workdir(run_dir)


def test_from_workdir_restores_the_run(separator):
  assert separator.step == 2
  assert separator.layer_names == ("square", "circle")
  assert separator.config.image_size == 32


@pytest.mark.parametrize("h,w", [(32, 32), (37, 53), (5, 70)])
def test_any_size_goes_through_and_comes_back_uncropped(separator, h, w):
  img = np.random.default_rng(0).random((h, w, 3)).astype(np.float32)
  out = separator(img)
  assert list(out) == ["square", "circle"]
  for layer in out.values():
    assert layer.shape == (h, w, 3) and layer.dtype == np.float32
    assert layer.min() >= 0 and layer.max() <= 1


def test_uint8_and_float_inputs_agree(separator):
  u8 = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  a = separator(u8)
  b = separator(u8.astype(np.float32) / 255)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_compiles_once_per_shape(separator):
  x = np.zeros((40, 40, 3), np.float32)
  separator(x)
  size = separator._separate._cache_size()
  separator(x + 0.5)
  assert separator._separate._cache_size() == size


def test_padding_matches_direct_call_on_stride_multiple(separator):
  x = np.random.default_rng(2).random((64, 32, 3)).astype(np.float32)
  direct = separator.separate_batch(x[None])[0]
  via_call = separator(x)
  np.testing.assert_allclose(via_call["square"], direct[0], atol=1e-6)


def test_input_conversions_and_errors():
  gray = np.full((4, 5), 128, np.uint8)
  assert to_float_rgb(gray).shape == (4, 5, 3)
  rgba = np.zeros((4, 5, 4), np.uint8)
  assert to_float_rgb(rgba).shape == (4, 5, 3)
  with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
    to_float_rgb(np.full((4, 4, 3), 255.0))
  with pytest.raises(ValueError, match="expected an image of shape"):
    to_float_rgb(np.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match="expected dtype"):
    to_float_rgb(np.zeros((4, 4, 3), np.int64))
  with pytest.raises(ValueError, match="NaN"):
    to_float_rgb(np.full((4, 4, 3), np.nan, np.float32))


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no training run"):
    Separator.from_workdir(str(tmp_path / "nothing"))


def test_separate_cli_on_mixed_directory(run_dir, tmp_path):
  src, dst = tmp_path / "in", tmp_path / "out"
  src.mkdir()
  rng = np.random.default_rng(3)
  Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(src / "odd.png")
  Image.fromarray(rng.integers(0, 256, (33, 20), dtype=np.uint8)).save(src / "gray.jpg")
  Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)).save(src / "alpha.png")
  (src / "broken.png").write_bytes(b"not a png")
  (src / "notes.txt").write_text("ignored: not an image extension")
  cmd = [sys.executable, "-m", "sils_jax.separate", f"--workdir={run_dir}", f"--input={src}", f"--output={dst}"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "broken.png" in out.stderr and "1 of 4 image(s) failed" in out.stderr
  for stem, (h, w) in {"odd": (45, 61), "gray": (33, 20), "alpha": (30, 30)}.items():
    for suffix in ("square", "circle", "recomposed"):
      with Image.open(dst / f"{stem}.{suffix}.png") as im:
        assert im.size == (w, h) and im.mode == "RGB"
  assert not (dst / "broken.square.png").exists()


def test_evaluate_cli_writes_metrics(run_dir):
  cmd = [sys.executable, "-m", "sils_jax.evaluate", f"--workdir={run_dir}", "--batch_size=4"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
  assert res["step"] == 2 and res["num_images"] == 8
  for name in ("square", "circle"):
    row = res["layers"][name]
    assert set(row) >= {"mse", "mse100", "lmse", "psnr", "ssim", "count"} and row["count"] == 8
    assert res["baselines"]["zero"][name]["lmse"] == pytest.approx(1.0, abs=1e-4)
  table = open(os.path.join(run_dir, "eval", "metrics.md")).read()
  assert "| method | square | circle | avg. |" in table and "each layer = x/2" in table
  with Image.open(os.path.join(run_dir, "eval", "examples.png")) as im:
    # 6 columns (test images) x 6 rows (x, 2 predicted, 2 true, re-blend) of 32 px + 2 px gaps
    assert im.size == (6 * 34 + 2, 6 * 34 + 2)


def test_too_large_images_get_a_clear_message(separator, monkeypatch):
  from sils_jax import inference
  monkeypatch.setattr(inference, "MAX_PIXELS", 32 * 32)
  with pytest.raises(ValueError, match="larger than the 1024 pixels separated in one piece"):
    separator(np.zeros((33, 32, 3), np.uint8), name="big.png")
  assert separator(np.zeros((32, 32, 3), np.uint8))["square"].shape == (32, 32, 3)
