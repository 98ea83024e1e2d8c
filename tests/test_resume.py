"""Surviving interruptions: exact resume after SIGKILL, SIGTERM saves and stops,
half-written checkpoints are ignored, NaN stops the run without a bad checkpoint."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sils_jax.training import checkpoints, loop
from sils_jax.training.state import create_states, init_key
from tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def _restore(workdir, step=None):
  config = tiny_config()
  manager = checkpoints.make_manager(workdir, config)
  abstract = jax.eval_shape(lambda: create_states(config, init_key(config.seed)))
  g, d, s = checkpoints.restore_latest(manager, *abstract, config, step=step)
  manager.close()
  return g, d, s


def _cli(workdir, steps, **overrides):
  args = [sys.executable, "-m", "sils_jax.main", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.num_train_steps={steps}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _wait_for(predicate, proc, timeout=600):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "process ended"
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.05)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  n = 30
  killed = str(tmp_path / "killed")
  ckpt = os.path.join(killed, "checkpoints")
  # the interrupted run makes its batches ahead in worker threads, the reference makes
  # them in the loop (the CPU default): equal results also show prefetching changes nothing
  prefetch = dict(prefetch_batches=3, input_workers=2)
  proc = subprocess.Popen(_cli(killed, 10_000, checkpoint_every_steps=2, eval_every_steps=100_000,
                               log_every_steps=100_000, **prefetch), env=ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: os.path.isdir(os.path.join(ckpt, "4")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  mgr = ocp.CheckpointManager(ckpt)
  at_kill = mgr.latest_step()
  mgr.close()
  assert 4 <= at_kill < n, at_kill  # killed mid-run, after the step-4 checkpoint

  # restart the same command with the final step count: resumes from `at_kill`
  out = subprocess.run(_cli(killed, n, checkpoint_every_steps=2, eval_every_steps=100_000, **prefetch),
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from the checkpoint at step {at_kill}" in out.stderr

  # uninterrupted reference, in this process
  config = tiny_config()
  config.num_train_steps = n
  config.eval_every_steps = 100_000
  config.checkpoint_every_steps = n
  config.prefetch_batches = 0
  loop.train_and_evaluate(config, str(tmp_path / "straight"))

  g1, d1, s1 = _restore(killed, n)
  g2, d2, s2 = _restore(str(tmp_path / "straight"), n)
  assert s1 == s2 == n and int(g1.step) == int(g2.step) == n
  for a, b in zip(jax.tree.leaves((g1, d1)), jax.tree.leaves((g2, d2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_half_written_checkpoint_is_never_picked(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  loop.train_and_evaluate(config, workdir)  # checkpoint at step 2
  # what a kill in the middle of an asynchronous save leaves behind
  tmp = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(tmp, "state"))
  with open(os.path.join(tmp, "state", "partial"), "wb") as f:
    f.write(b"\0" * 100)
  g, d, step = _restore(workdir)
  assert step == 2
  config.num_train_steps = 3
  assert loop.train_and_evaluate(config, workdir)["step"] == 3


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_cli(workdir, 10_000, checkpoint_every_steps=100_000, eval_every_steps=100_000,
                               log_every_steps=1), env=ENV, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in proc.stderr:
      seen.append(line)
      if "step 3/10000" in line:
        proc.send_signal(signal.SIGTERM)
        break
    rest = proc.communicate(timeout=300)[1]
  finally:
    if proc.poll() is None:
      proc.kill()
  log = "".join(seen) + rest
  assert proc.returncode == 0, log[-3000:]
  assert "SIGTERM: saved the checkpoint at step" in log
  _, _, step = _restore(workdir)
  assert 3 <= step < 10_000


class _PoisonedData:
  """The synthetic data, with NaN in the inputs of one step."""

  def __init__(self, data, bad_step):
    self._data, self._bad = data, bad_step

  def __getattr__(self, name):
    return getattr(self._data, name)

  def train_batch(self, step, *args, **kwargs):
    batch = self._data.train_batch(step, *args, **kwargs)
    if step == self._bad:
      batch = dict(batch, x=np.full_like(batch["x"], np.nan))
    return batch


def test_nan_stops_with_the_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = loop.make_dataset
  monkeypatch.setattr(loop, "make_dataset", lambda config: _PoisonedData(real(config), bad_step=4))
  config = tiny_config()
  config.num_train_steps = 8
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"step 5: non-finite .*g_total") as err:
    loop.train_and_evaluate(config, workdir)
  assert "last checkpoint (step 4) is intact" in str(err.value)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [2, 4]
  g, d, _ = _restore(workdir)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves((g.params, d.params)))
