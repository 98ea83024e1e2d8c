"""Evaluation metrics (pure jax.numpy functions).

The paper reports "image MSE x 100" per layer on the synthetic set (Sec. 5.2,
Fig. 3c): the mean squared error of each image over its pixels and channels,
averaged over the test images. Functions here return the plain MSE; multiply by
100 to compare with the paper.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mse(a, b) -> jnp.ndarray:
  """Mean squared error per image, averaged over the batch.

  ``mse(a, b) = 1/N sum_n 1/(H W C) sum_{h,w,c} (a[n,h,w,c] - b[n,h,w,c])^2``

  Args:
    a, b: images [H, W, C] or [N, H, W, C] with values in [0, 1]; same shape.

  Returns:
    A float32 scalar. Pure and jittable (shape checks are static).
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape or a.ndim not in (3, 4):
    raise ValueError(
        f"mse expects two images [H, W, C] or two batches [N, H, W, C] of the same "
        f"shape, got shapes {a.shape} and {b.shape}")
  diff = a.astype(jnp.float32) - b.astype(jnp.float32)
  per_image = jnp.mean(jnp.square(diff), axis=(-3, -2, -1))
  return jnp.mean(per_image)


# mse of every layer: [B, N, H, W, C] x 2 -> [N] (jitted so that large eval sets
# are reduced in one fused pass, without materialising per-layer copies).
_layer_mses = jax.jit(jax.vmap(mse, in_axes=(1, 1)))
_baseline_mses = jax.jit(jax.vmap(mse, in_axes=(None, 1)))


def _check_layers(pred_layers, true_layers, names: Sequence[str], what: str):
  if pred_layers.shape != true_layers.shape or pred_layers.ndim != 5:
    raise ValueError(
        f"{what} expects predicted and true layers [B, N, H, W, C] of the same shape, "
        f"got shapes {pred_layers.shape} and {true_layers.shape}")
  if pred_layers.shape[1] != len(names):
    raise ValueError(
        f"{what}: layers have N={pred_layers.shape[1]} (axis 1 of shape "
        f"{pred_layers.shape}) but {len(names)} names were given: {tuple(names)}")


def per_layer_mse(pred_layers, true_layers, names: Sequence[str]) -> dict:
  """``{names[k]: mse(pred_layers[:, k], true_layers[:, k])}`` for [B, N, H, W, C] inputs."""
  pred_layers, true_layers = jnp.asarray(pred_layers), jnp.asarray(true_layers)
  _check_layers(pred_layers, true_layers, names, "per_layer_mse")
  scores = _layer_mses(pred_layers, true_layers)
  return {name: scores[k] for k, name in enumerate(names)}


def trivial_baselines(x, true_layers, names: Sequence[str]) -> dict:
  """Per-layer MSE of the two trivial separations of ``x`` into N layers.

  * ``'x_over_n'``: every layer predicted as ``x / N`` (exact for the additive
    blend when all layers are equal);
  * ``'zero'``: every layer predicted as 0 (the score is the layer's mean square).

  Args:
    x: inputs [B, H, W, C].
    true_layers: ground-truth layers [B, N, H, W, C].
    names: N layer names.

  Returns:
    ``{'x_over_n': {name: mse}, 'zero': {name: mse}}``.
  """
  x, true_layers = jnp.asarray(x), jnp.asarray(true_layers)
  if x.ndim != 4 or true_layers.ndim != 5 or x.shape[0] != true_layers.shape[0] \
      or x.shape[1:] != true_layers.shape[2:]:
    raise ValueError(
        f"trivial_baselines expects x [B, H, W, C] and true_layers [B, N, H, W, C], "
        f"got shapes {x.shape} and {true_layers.shape}")
  n = true_layers.shape[1]
  if n != len(names):
    raise ValueError(
        f"trivial_baselines: true_layers have N={n} (axis 1 of shape "
        f"{true_layers.shape}) but {len(names)} names were given: {tuple(names)}")
  x = x.astype(jnp.float32)
  x_over_n = _baseline_mses(x / n, true_layers)
  zero = _baseline_mses(jnp.zeros_like(x), true_layers)
  return {
      "x_over_n": {name: x_over_n[k] for k, name in enumerate(names)},
      "zero": {name: zero[k] for k, name in enumerate(names)},
  }
