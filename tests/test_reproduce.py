"""benchmarks/reproduce_synthetic.py: each experiment name maps to the config overrides it claims."""

import pytest

from benchmarks.reproduce_synthetic import overrides


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
