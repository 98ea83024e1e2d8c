"""Blend modes: how layers fuse into an image, eq. (1) of the paper.

    "I = L_1 ⊕ L_2 ⊕ ..., (1) where L_i is the i-th layer and I is the input
    image that can be reconstructed by a pixel-wise blend of all the layers."

Two blends are used by the paper's tasks:

* ``"additive"`` -- reflection separation, ``I = L_R + L_B``.
* ``"multiplicative"`` -- intrinsic decomposition, ``I = L_A * L_S``, i.e. additive
  in the log domain, ``log I = log L_A + log L_S``. Layers are clamped to ``eps``
  before the product so that zeros and negatives (e.g. a generator's raw output)
  give finite values and finite gradients.

Every function here is pure, jittable (``mode`` is static: use
``jax.jit(compose, static_argnames="mode")``) and computes in float32.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax.numpy as jnp

Array = jnp.ndarray
Layers = Union[Array, Sequence[Array]]

MODES = ("additive", "multiplicative")


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_eps(eps) -> None:
  if isinstance(eps, (int, float)) and not eps > 0:
    raise ValueError(f"eps must be > 0 (the clamp before the log domain), got {eps!r}")


def _stack(layers: Layers, name: str) -> Array:
  """Layers as one float32 array whose axis 0 is the layer axis."""
  if isinstance(layers, (list, tuple)):
    arrays = [jnp.asarray(layer, jnp.float32) for layer in layers]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
      raise ValueError(
          f"{name} must all have the same shape, got shapes "
          f"{[a.shape for a in arrays]}")
    if not arrays:
      return jnp.zeros((0,), jnp.float32)
    return jnp.stack(arrays)
  stacked = jnp.asarray(layers, jnp.float32)
  if stacked.ndim == 0:
    raise ValueError(
        f"{name} must be a sequence of arrays or one array whose axis 0 is the "
        f"layer axis, got a scalar")
  return stacked


def compose(layers: Layers, mode: str, eps: float = 1e-4) -> Array:
  """Blends N layers into one image, eq. (1): ``I = L_1 ⊕ L_2 ⊕ ...``.

  * ``"additive"`` (reflection, ``I = L_R + L_B``): ``I = sum_k L_k``.
  * ``"multiplicative"`` (intrinsic, ``I = L_A * L_S``, additive in the log
    domain ``log I = sum_k log L_k``): ``I = exp(sum_k log(max(L_k, eps)))``,
    computed as the equal ``prod_k max(L_k, eps)`` (no exp/log round trip, so it
    equals the plain product to float32 rounding when every ``L_k >= eps``).

  Args:
    layers: a sequence of N same-shape arrays, or one array whose axis 0 is the
      layer axis.
    mode: one of ``MODES``.
    eps: clamp of the multiplicative mode; values below it count as ``eps``
      (gradient 0 there), so zeros and negatives give finite values and gradients.

  Returns:
    The blended image, float32, the shape of one layer.
  """
  _check_mode(mode)
  _check_eps(eps)
  stacked = _stack(layers, "layers")
  if stacked.shape[0] == 0:
    raise ValueError("layers must hold at least one layer, got none")
  if mode == "additive":
    return jnp.sum(stacked, axis=0)
  return jnp.prod(jnp.maximum(stacked, jnp.float32(eps)), axis=0)


def complement(x: Array, known_layers: Layers, mode: str,
               eps: float = 1e-4) -> Array:
  """The one layer that completes ``x`` given the other N-1 layers of eq. (1).

  Solves ``x = L_1 ⊕ ... ⊕ L_N`` for ``L_N`` (the "decompose" direction):

  * ``"additive"``: ``L_N = x - sum_k L_k``.
  * ``"multiplicative"``: ``L_N = x / prod_k max(L_k, eps)``.

  Then ``compose(list(known_layers) + [complement(x, known_layers, mode)], mode)
  == x``: always for ``"additive"``; for ``"multiplicative"`` whenever the
  result is itself ``>= eps`` (``compose`` clamps it), which holds when
  ``x >= eps`` and every known layer lies in ``[eps, 1]`` (images in [0, 1]).

  Args:
    x: the blended image.
    known_layers: a sequence of N-1 arrays of ``x``'s shape (may be empty), or one
      array whose axis 0 is the layer axis.
    mode: one of ``MODES``.
    eps: clamp of the multiplicative mode, as in ``compose``.

  Returns:
    The missing layer, float32, ``x``'s shape.
  """
  _check_mode(mode)
  _check_eps(eps)
  x = jnp.asarray(x, jnp.float32)
  stacked = _stack(known_layers, "known_layers")
  if stacked.shape[0] == 0:
    return x
  if stacked.shape[1:] != x.shape:
    raise ValueError(
        f"known_layers must have x's shape {x.shape}, got {stacked.shape[1:]}")
  if mode == "additive":
    return x - jnp.sum(stacked, axis=0)
  return x / jnp.prod(jnp.maximum(stacked, jnp.float32(eps)), axis=0)
