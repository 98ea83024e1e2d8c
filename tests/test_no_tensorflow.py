"""Training, checkpointing, resuming and inference with TensorFlow impossible to import
(accelerator hosts have jax/flax/optax/orbax but no TensorFlow)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocking TensorFlow with an import hook is not faithful: etils (under orbax) asks
# importlib.util.find_spec("tensorflow") and a hook can only make that raise, which a
# real absence never does. So the test runs where TensorFlow is really absent (CI
# installs none) and is skipped where it is installed.
SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from tiny_config import tiny_config
    from sils_jax.training import loop
    from sils_jax.inference import Separator

    workdir = sys.argv[1]
    config = tiny_config()
    config.tensorboard = "auto"  # falls back to the TF-free writer
    loop.train_and_evaluate(config, workdir)
    config.num_train_steps = 3  # resume from the step-2 checkpoint
    print("result", loop.train_and_evaluate(config, workdir))
    layers = Separator.from_workdir(workdir)(np.zeros((20, 30, 3), np.uint8))
    print("layers", sorted(layers), layers["square"].shape)
    print("tensorflow loaded:", any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules))
""")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed here; this test checks the TF-free path")
def test_train_resume_and_separate_without_tensorflow(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  script = SCRIPT.format(tests=os.path.join(ROOT, "tests"))
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "result {'step': 3" in out.stdout
  assert "layers ['circle', 'square'] (20, 30, 3)" in out.stdout
  assert "tensorflow loaded: False" in out.stdout
  assert os.path.exists(tmp_path / "run" / "train_metrics.jsonl")
  assert os.path.exists(tmp_path / "run" / "samples" / "separation_0000003.png")
