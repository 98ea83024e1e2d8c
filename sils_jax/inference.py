"""Using a trained model: ``Separator.from_workdir(RUN)(image) -> {layer_name: layer}``.

No TensorFlow is needed. The generator is fully convolutional: an image of any size
is padded (mirror padding) to a multiple of the encoder's total stride, separated at
its own resolution (nothing is resized) and cropped back.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from sils_jax import blend, default_config
from sils_jax.training import checkpoints
from sils_jax.training.state import create_states, init_key, make_generator
from sils_jax.training.step import predict

# Largest image (in pixels) separated in one piece; a 4096x4096 image needs about
# 3 GB of activations per layer stream with the synthetic generator.
MAX_PIXELS = 4096 * 4096


def to_float_rgb(image: Any, name: str = "image") -> np.ndarray:
  """uint8/uint16/float image (HxW, HxWx1, HxWx3 or HxWx4) -> float32 HxWx3 in [0, 1].

  Grayscale is repeated to 3 channels and an alpha channel is dropped (both logged).
  """
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{name}: expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got {a.shape}")
  if a.dtype == np.uint8:
    a = a.astype(np.float32) / 255.0
  elif a.dtype == np.uint16:
    a = a.astype(np.float32) / 65535.0
  elif np.issubdtype(a.dtype, np.floating):
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name}: the image contains NaN or inf values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
      raise ValueError(f"{name}: float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                       "(pass uint8 for 0..255 data)")
    a = np.clip(a, 0.0, 1.0)
  else:
    raise ValueError(f"{name}: expected dtype uint8, uint16 or float in [0, 1], got {a.dtype}")
  if a.shape[-1] == 1:
    logging.info("%s: grayscale, repeated to 3 channels", name)
    a = np.repeat(a, 3, axis=-1)
  elif a.shape[-1] == 4:
    logging.info("%s: RGBA, alpha channel dropped", name)
    a = a[..., :3]
  return a


def _restore_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The run's saved config, filled in once with the fields added since it was saved."""
  raw = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return default_config.complete(raw)


class Separator:
  """A trained generator: call it on an image to get its layers."""

  def __init__(self, config, params, batch_stats, step: int = 0):
    self.config = config
    self.layer_names = tuple(config.layer_names)
    self.step = step
    self._params, self._batch_stats = params, batch_stats
    # input sizes must be multiples of the encoder's total stride (padded up to one)
    self._multiple = 16 if config.generator == "vgg" else 2 ** len(config.encoder_features)
    model = make_generator(config, axis_name=None)
    run = functools.partial(predict, model, norm_stats=config.eval_norm_stats)
    # jax.jit compiles once per input shape and caches the result.
    self._separate = jax.jit(run)
    self._encode = jax.jit(functools.partial(run, method="encode"))
    self._encode_layers = jax.jit(functools.partial(run, method="encode_layers"))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> "Separator":
    """Restores the latest (or the given) checkpoint of a training run."""
    ckpt_dir = checkpoints.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
      raise FileNotFoundError(f"{ckpt_dir} does not exist: {workdir!r} holds no training run "
                              "(train one with python -m sils_jax.main --workdir=...)")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0))
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint")
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {ckpt_dir}; available: {sorted(steps)}")
    config = _restore_config(manager, step)
    abstract = jax.eval_shape(lambda: create_states(config, init_key(config.seed)))
    g_state, _, _ = checkpoints.restore_latest(manager, *abstract, config, step=step)
    manager.close()
    return cls(config, g_state.params, g_state.batch_stats, step)

  # --- arrays in, arrays out ---------------------------------------------
  def separate_batch(self, x: np.ndarray) -> np.ndarray:
    """x [B, H, W, 3] float in [0, 1], H and W multiples of the stride -> [B, N, H, W, 3]."""
    return np.clip(np.asarray(self._separate(self._params, self._batch_stats, jnp.asarray(x))), 0.0, 1.0)

  def encode(self, x: np.ndarray) -> list[np.ndarray]:
    """Latent codes E_k(x), flattened: a list over streams of [B, D]."""
    codes = self._encode(self._params, self._batch_stats, jnp.asarray(x))
    return [np.asarray(c[-1]).reshape(len(x), -1) for c in codes]

  def encode_layers(self, layers: np.ndarray) -> list[np.ndarray]:
    """E_k(layer k) for layers [B, N, H, W, 3], flattened: a list over streams of [B, D]."""
    codes = self._encode_layers(self._params, self._batch_stats, jnp.asarray(layers))
    return [np.asarray(c[-1]).reshape(len(layers), -1) for c in codes]

  def test_data(self, count: int | None = None) -> dict[str, np.ndarray]:
    """Ground-truth test triplets of the run's dataset: {'x', 'layers'}."""
    from sils_jax.training.loop import make_dataset
    return make_dataset(self.config).test_arrays(count)

  def recompose(self, layers: dict[str, np.ndarray]) -> np.ndarray:
    """The task's blend of separated layers (as in the cycle loss)."""
    stacked = np.stack([layers[n] for n in self.layer_names])
    return np.clip(np.asarray(blend.compose(stacked, self.config.blend_mode)), 0.0, 1.0)

  # --- images of any size ------------------------------------------------
  def __call__(self, image: Any, name: str = "image") -> dict[str, np.ndarray]:
    """image: HxWx3 (or gray / RGBA) uint8, or float in [0, 1] -> {layer_name: HxWx3 float32 in [0, 1]}."""
    x = to_float_rgb(image, name)
    h, w, _ = x.shape
    if h * w > MAX_PIXELS:
      raise ValueError(f"{name}: {w}x{h} is larger than the {MAX_PIXELS} pixels separated in one "
                       "piece; downscale or crop it first")
    m = self._multiple
    ph, pw = -h % m, -w % m
    padded = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    out = self.separate_batch(padded[None])[0, :, :h, :w]
    return {n: out[k] for k, n in enumerate(self.layer_names)}
