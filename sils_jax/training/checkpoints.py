"""Orbax checkpoints of the generator and discriminator states in WORKDIR/checkpoints.

Everything the run needs to continue is in the states and the step: the data order
is a pure function of (seed, step) and the train step draws no randomness.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from sils_jax.training.config_checks import ConfigError

# Fields that change the parameter shapes or the meaning of the saved state; a
# resumed run must agree on them. Others (num_train_steps, logging, and the forms
# of the same maths: cpu_kernels, compute_dtype) may change.
ARCHITECTURE_FIELDS = ("layer_names", "image_size", "encoder_features", "decoder_features", "norm",
                       "disc_branches", "disc_features", "output_activation", "generator",
                       "vgg_preprocess", "vgg_channel_divisor", "freeze_encoder")


def checkpoint_dir(workdir: str) -> str:
  """Where a run's checkpoints live: WORKDIR/checkpoints (absolute, as orbax wants)."""
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, g_state, d_state, config) -> None:
  """Saves asynchronously (returns once the arrays are copied to host memory).

  The states are identical on every device and process (pmean), so they are saved
  as host numpy arrays: orbax writes those once, from the primary process, which
  also works for the per-process arrays of a multi-host pmap.
  """
  host = jax.device_get({"g": g_state, "d": d_state})
  global_batch = config.per_device_batch_size * jax.device_count()
  meta = {
      "step": int(step),
      # The input pipeline's position: the data order is a pure function of
      # (seed, step), so these are enough to continue it exactly.
      "data": {"seed": int(config.seed), "next_step": int(step), "examples_seen": int(step) * global_batch},
      # Randomness: parameters are initialised from init_key(seed); the train step
      # itself draws no random numbers, so there is no RNG stream to save.
      "rng": {"init_key": f"jax.random.key({int(config.seed)}, impl='rbg')", "train_step": "none"},
  }
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(host),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      meta=ocp.args.JsonSave(meta)), force=True)


def check_compatible(saved: dict, config) -> None:
  for field in ARCHITECTURE_FIELDS:
    now = json.loads(json.dumps(config.to_dict().get(field)))
    if field in saved and saved[field] != now:
      raise ConfigError(f"config.{field} differs from the checkpoint's ({saved[field]!r} there, "
                       f"{now!r} now): it changes the model, so the run cannot resume. "
                       "Use a new --workdir, or restore the field.")


def restore_latest(manager: ocp.CheckpointManager, g_state, d_state, config, step: int | None = None):
  """Returns (g_state, d_state, step) from the latest (or given) checkpoint, or the inputs and 0."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return g_state, d_state, 0
  saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  check_compatible(saved_config, config)
  # numpy targets: restored on the host of every process, then replicated by the caller
  target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), {"g": g_state, "d": d_state})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]["g"], restored["state"]["d"], int(step)
