"""The tiny variants of the real-image configs train through `main` on fake directory
trees of each layout (MIT Intrinsic, SIR², the user's own folders), and the result
restores, evaluates and separates."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fake_trees import make_folder_tree, make_mit_tree, make_sir2_tree

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# sir2 and image_folders compile the same train step (the persistent compilation
# cache of conftest.py then compiles it once); MIT's differs anyway (multiplicative
# blend), so it also carries the frozen-encoder check.
CASES = {
    "mit_intrinsic": (make_mit_tree, ("albedo", "shading"), ["--config.freeze_encoder=True"]),
    "sir2": (make_sir2_tree, ("background", "reflection"), []),
    "image_folders": (make_folder_tree, ("background", "reflection"), ["--config.test_folder=test"]),
}


def _train(tmp_path, name: str, extra=(), flags=None) -> str:
  make_tree, _, case_flags = CASES[name]
  flags = case_flags if flags is None else flags
  manual_dir = make_tree(tmp_path / "raw")
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "sils_jax.main", f"--config=configs/{name}.py:tiny", f"--workdir={workdir}",
         f"--config.manual_dir={manual_dir}", f"--config.data_dir={tmp_path / 'tfds'}", *flags, *extra]
  log = tmp_path / "log.txt"
  with open(log, "w") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=900).returncode
  text = log.read_text()
  assert rc == 0, text[-3000:]
  assert "Traceback" not in text
  return workdir


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_config_trains_through_main(tmp_path, name):
  workdir = _train(tmp_path, name)
  names = CASES[name][1]
  evals = [json.loads(l) for l in open(os.path.join(workdir, "eval_metrics.jsonl"))]
  last = evals[-1]
  assert last["step"] == 2
  for layer in names:
    assert np.isfinite(last[f"mse100_{layer}"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "2"
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["vgg_preprocess"] == "torch"  # 'auto' without weights, resolved before saving
  assert os.listdir(os.path.join(workdir, "samples"))

  from sils_jax.evaluate import evaluate
  from sils_jax.inference import Separator
  sep = Separator.from_workdir(workdir)
  assert sep.layer_names == names and sep.step == 2
  result, grid = evaluate(sep, num_examples=2)
  assert result["num_images"] == len(sep.test_data()["x"]) >= 2 and grid is not None
  if name == "mit_intrinsic":
    assert np.isfinite(result["mit_lmse_total"])  # Table 1's LMSE total, with the masks
  # any image size: padded to a multiple of 16 inside
  out = sep(np.random.default_rng(0).random((37, 50, 3)).astype(np.float32))
  assert set(out) == set(names) and out[names[0]].shape == (37, 50, 3)

  if name == "mit_intrinsic":  # config.freeze_encoder: E_k stay at their initial weights, G_k train
    from sils_jax.training.state import create_states, init_key
    init, _ = create_states(sep.config, init_key(sep.config.seed))
    for k in range(2):
      for a, b in zip(jax.tree.leaves(init.params[f"E{k}"]), jax.tree.leaves(sep._params[f"E{k}"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(init.params["G0"]), jax.tree.leaves(sep._params["G0"]))]
    assert max(moved) > 0


def test_image_folders_without_test_triplets_train_and_say_so(tmp_path):
  workdir = _train(tmp_path, "image_folders", flags=[])  # no --config.test_folder
  assert "no test triplets" in (tmp_path / "log.txt").read_text()
  assert os.listdir(os.path.join(workdir, "samples"))  # grids of training inputs and their layers
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "2"
  from sils_jax.evaluate import evaluate
  from sils_jax.inference import Separator
  with pytest.raises(ValueError, match="no test triplets"):
    evaluate(Separator.from_workdir(workdir))


def test_bad_data_directory_is_a_clear_error(tmp_path):
  cmd = [sys.executable, "-m", "sils_jax.main", "--config=configs/mit_intrinsic.py:tiny",
         f"--workdir={tmp_path / 'run'}", f"--config.manual_dir={tmp_path / 'nowhere'}",
         f"--config.data_dir={tmp_path / 'tfds'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode != 0
  assert "nowhere" in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "tfds" / "mit_intrinsic")
