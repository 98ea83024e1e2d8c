"""sils_jax/reproduce.py (`python -m sils_jax.reproduce`): each experiment name maps to the config
overrides it claims; the summary table; the configs it needs."""

import pytest

from sils_jax.reproduce import overrides


def test_ablations_zero_their_terms():
  assert overrides("full", 2) == []
  assert overrides("no_ss", 3) == ["--config.lambda_intra=(0.0,0.0,0.0)", "--config.lambda_inter=0.0"]
  assert overrides("no_cc", 2) == ["--config.lambda_cycle_x=0.0", "--config.lambda_cycle_layers=(0.0,0.0)"]


def test_ratio_splits_lambda_intra_over_layers():
  assert overrides("ratio_0.1", 2) == ["--config.lambda_intra=(0.05,0.05)", "--config.lambda_inter=1.0"]


def test_w_grid_puts_the_whole_cycle_weight_in_w2():
  assert overrides("w_0.1_10", 2) == ["--config.w1=0.1", "--config.w2=10.0", "--config.lambda_cycle_x=1.0",
                                      "--config.lambda_cycle_layers=(1.0,1.0)"]


@pytest.mark.parametrize("name", ["w_1", "w_a_b", "nonsense"])
def test_bad_names_exit_with_a_message(name):
  with pytest.raises(SystemExit, match="experiment|unknown"):
    overrides(name, 2)


def _metrics(square, circle):
  layer = lambda v: {"mse100": v}
  return {"step": 10, "layers": {"square": layer(square), "circle": layer(circle)},
          "baselines": {"x_over_n": {"square": layer(0.8), "circle": layer(0.8)},
                        "zero": {"square": layer(1.2), "circle": layer(2.6)}}}


def test_summary_groups_seeds_and_tags_and_reports_mean_and_std(tmp_path):
  import json
  import os

  from sils_jax.reproduce import collect, write
  runs = {"full_seed0": (1.0, 2.0), "full_seed1": (3.0, 4.0), "full_norm-none_seed0": (0.5, 0.5)}
  for name, (sq, ci) in runs.items():
    os.makedirs(tmp_path / name / "eval")
    (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(_metrics(sq, ci)))
  os.makedirs(tmp_path / "unfinished_seed0")  # no metrics: left out
  results = collect(str(tmp_path))
  assert sorted(results) == ["full", "full_norm-none"] and len(results["full"]) == 2
  md = write(str(tmp_path), results)
  assert "| full | 2 | 10 | 2.000 ± 1.000 | 3.000 ± 1.000 | 2.500 ± 1.000 |" in md
  assert "| full_norm-none | 1 | 10 | 0.500 | 0.500 | 0.500 |" in md
  assert (tmp_path / "results.md").read_text().strip() == md


def test_summary_of_an_empty_workdir_says_so(tmp_path):
  from sils_jax.reproduce import collect
  with pytest.raises(SystemExit, match="no finished runs"):
    collect(str(tmp_path))


def test_the_configs_are_found_in_the_source_tree_and_missing_ones_say_so(tmp_path):
  from sils_jax import reproduce
  reproduce.check_configs()  # this checkout: ROOT holds configs/synthetic.py
  with pytest.raises(SystemExit, match="configs/synthetic.py.*source tree"):
    reproduce.check_configs(str(tmp_path))


def test_the_command_runs_as_a_module_from_any_directory(tmp_path):
  """`python -m sils_jax.reproduce --summary` started outside the checkout (the package
  importable, as after `pip install -e .`) reads the --workdir relative to where it runs."""
  import json
  import os
  import subprocess
  import sys

  from sils_jax import reproduce
  os.makedirs(tmp_path / "runs" / "full_seed0" / "eval")
  (tmp_path / "runs" / "full_seed0" / "eval" / "metrics.json").write_text(json.dumps(_metrics(1.0, 2.0)))
  env = dict(os.environ, PYTHONPATH=reproduce.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-m", "sils_jax.reproduce", "--workdir=runs", "--summary"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| full | 1 | 10 | 1.000 | 2.000 | 1.500 |" in out.stdout
  assert (tmp_path / "runs" / "results.md").exists()
