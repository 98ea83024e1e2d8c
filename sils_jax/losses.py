"""Loss terms of the paper, eqs. (4)-(9), as pure functions.

The overall objective, eq. (4):

    min_{E,G} max_D  L_SS(E_y, E_z) + L_GAN_y(E_y, G_y, D_y) + L_GAN_z(E_z, G_z, D_z)
                     + L_CC_x(E_y, G_y, E_z, G_z) + L_CC_y(E_y, G_y) + L_CC_z(E_z, G_z)

and its weighted form of sec. 5.2, eq. (9):  ``min max w1 L_SS + L_GAN + w2 L_CC``.

Every term is generalised from two layers (y, z) to N layers indexed by k, so that
two- and three-layer separation share one code path. Everything is pure, jittable
(string arguments ``mode``/``kind`` are static) and computes in float32. Sigmoid
and log terms are computed from logits in stable forms, so that no finite input
(0, +-1e6, mixtures) gives NaN or inf in a value or a gradient.
"""

from __future__ import annotations

import itertools
from typing import Dict, Sequence, Union

import jax
import jax.numpy as jnp

Array = jnp.ndarray
Code = Union[Array, Sequence[Array]]  # one latent code, or one array per encoder level
Logits = Union[Array, Sequence[Array]]  # one array, or one per discriminator branch

SS_MODES = ("elementwise", "mean")
GAN_KINDS = ("nsgan", "lsgan")


def _f32(x) -> Array:
  return jnp.asarray(x, jnp.float32)


def _check_choice(value, name: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_alpha(alpha) -> None:
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f"alpha must be > 0 (eq. (6) divides by alpha^2), got {alpha!r}")


def _length(value, name: str) -> int:
  try:
    return len(value)
  except TypeError:
    raise ValueError(
        f"{name} must be a sequence (one entry per layer), got {type(value).__name__}"
    ) from None


def _as_list(arrays, name: str) -> list:
  """One array or a list/tuple of arrays -> a non-empty list of float32 arrays."""
  if isinstance(arrays, (list, tuple)):
    if not arrays:
      raise ValueError(f"{name} must hold at least one array, got an empty sequence")
    return [_f32(a) for a in arrays]
  return [_f32(arrays)]


def _one_minus_d_psi(dist: Array, alpha) -> Array:
  """``1 - d_psi`` of eq. (6) from the distance ``|a - b|``, as ``sigmoid(-z)``.

  ``1 - sigmoid(z) = sigmoid(-z)`` keeps full precision where ``d_psi`` is near 1.
  """
  alpha = _f32(alpha)
  return jax.nn.sigmoid(-(dist - alpha * jnp.exp(alpha)) / alpha**2)


# --------------------------------------------------------------------------- SS


def ss_distance(a: Array, b: Array, alpha: float = 1.4) -> Array:
  """Elementwise inter-latent-space distance d_psi, eq. (6).

      d_psi(a, b) = 1 / (1 + e^{g(a, b)}),
      g(a, b) = -(|a - b| - alpha e^alpha) / alpha^2                           (6)

  computed as the equal ``sigmoid((|a - b| - alpha e^alpha) / alpha^2)``: values
  in [0, 1], 0.5 at ``|a - b| = alpha e^alpha``, increasing in ``|a - b|``.
  ``alpha`` (paper default 1.4) shapes the curve (Fig. 3b top, where
  ``loss = 1 - d_psi``). The gradient is finite everywhere, at ``a == b`` too
  (``|.|`` takes a subgradient).

  Args:
    a, b: arrays of broadcastable shapes.
    alpha: alpha of eq. (6), > 0.

  Returns:
    d_psi elementwise, float32, the broadcast shape of ``a`` and ``b``.
  """
  _check_alpha(alpha)
  alpha = _f32(alpha)
  dist = jnp.abs(_f32(a) - _f32(b))
  return jax.nn.sigmoid((dist - alpha * jnp.exp(alpha)) / alpha**2)


def l1_distance(a: Array, b: Array) -> Array:
  """Intra-latent-space distance d_phi of eq. (5): the L1 distance ``|a - b|``.

      d_phi(a, b) = mean over all elements of |a - b|

  (the paper: "we minimize the L1 distance between E_y(x_i) and E_y(y_i)").

  Returns:
    A float32 scalar.
  """
  return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


def ss_loss(codes_x: Sequence[Code], codes_layers: Sequence[Code], *,
            lambda_intra: Sequence[float], lambda_inter: float,
            alpha: float = 1.4, mode: str = "elementwise",
            scale: float = 10.0) -> Dict[str, Array]:
  """Self-supervision loss L_SS, eq. (5), generalised to N layers.

      L_SS(E_y, E_z) = lambda_1 d_phi(E_y(y), E_y(x)) + lambda_2 d_phi(E_z(z), E_z(x))
                       + lambda_3 (1 - d_psi(E_y(x), E_z(x)))                  (5)

  For N layers: intra term k is ``lambda_intra[k] * d_phi(E_k(y_k), E_k(x))`` and
  the inter term is ``lambda_inter * mean_{k<l} (1 - d_psi(E_k(x), E_l(x)))``; for
  N = 2 this is exactly eq. (5). When codes hold several encoder levels, every
  distance is averaged over the levels.

  ``mode`` chooses how ``1 - d_psi`` reads a pair of codes:

  * ``"elementwise"`` (the paper's reading): ``1 - d_psi`` elementwise on
    ``|a - b|``, averaged over elements.
  * ``"mean"`` (the authors' earlier code, DreamtaleCore/USIS): per level one
    scalar ``dist = scale * mean|a - b|``, then ``1 - d_psi(dist, 0)``.

  d_phi is the mean L1 distance in both modes.

  Args:
    codes_x: N codes; ``codes_x[k]`` is ``E_k(x)``, stream k's encoder applied
      to the mixture. A code is one array or a list/tuple of arrays (levels).
    codes_layers: N codes; ``codes_layers[k]`` is ``E_k(y_k)``, stream k's
      encoder applied to an unpaired sample of layer k; same structure.
    lambda_intra: N weights (paper: lambda_1 = lambda_2 = 0.5).
    lambda_inter: one weight (paper: lambda_3 = 1.0).
    alpha: alpha of eq. (6) (paper: 1.4).
    mode: one of ``SS_MODES``.
    scale: multiplier of the mean distance in ``"mean"`` mode (USIS: 10).

  Returns:
    ``{"ss_intra_0", ..., "ss_intra_{N-1}", "ss_inter", "ss"}``: the weighted
    terms and their sum, float32 scalars.
  """
  _check_choice(mode, "mode", SS_MODES)
  _check_alpha(alpha)
  n = _length(codes_x, "codes_x")
  if n < 2:
    raise ValueError(f"codes_x must hold N >= 2 codes (one per layer), got {n}")
  if _length(codes_layers, "codes_layers") != n:
    raise ValueError(
        f"codes_layers must hold one code per layer like codes_x ({n}), "
        f"got {len(codes_layers)}")
  if _length(lambda_intra, "lambda_intra") != n:
    raise ValueError(
        f"lambda_intra must hold one weight per layer ({n}), got {len(lambda_intra)}")

  levels_x = [_as_list(c, f"codes_x[{k}]") for k, c in enumerate(codes_x)]
  levels_y = [_as_list(c, f"codes_layers[{k}]") for k, c in enumerate(codes_layers)]
  shapes = [a.shape for a in levels_x[0]]
  for name, codes in (("codes_x", levels_x), ("codes_layers", levels_y)):
    for k, levels in enumerate(codes):
      if [a.shape for a in levels] != shapes:
        raise ValueError(
            f"{name}[{k}] must have the levels and shapes of codes_x[0] {shapes}, "
            f"got {[a.shape for a in levels]}")

  def inter(a: Array, b: Array) -> Array:
    if mode == "elementwise":
      return jnp.mean(_one_minus_d_psi(jnp.abs(a - b), alpha))
    return _one_minus_d_psi(_f32(scale) * jnp.mean(jnp.abs(a - b)), alpha)

  out = {}
  for k in range(n):
    d_phi = jnp.mean(jnp.stack(
        [l1_distance(y, x) for y, x in zip(levels_y[k], levels_x[k])]))
    out[f"ss_intra_{k}"] = _f32(lambda_intra[k]) * d_phi
  pairs = [
      jnp.mean(jnp.stack([inter(a, b) for a, b in zip(levels_x[k], levels_x[l])]))
      for k, l in itertools.combinations(range(n), 2)
  ]
  out["ss_inter"] = _f32(lambda_inter) * jnp.mean(jnp.stack(pairs))
  out["ss"] = sum(out[f"ss_intra_{k}"] for k in range(n)) + out["ss_inter"]
  return out


# -------------------------------------------------------------------------- GAN


def _branches(real_logits: Logits, fake_logits: Logits):
  real = _as_list(real_logits, "real_logits")
  fake = _as_list(fake_logits, "fake_logits")
  if len(real) != len(fake):
    raise ValueError(
        f"real_logits and fake_logits must have one array per discriminator branch "
        f"each, got {len(real)} and {len(fake)}")
  return real, fake


def nsgan_d_loss(real_logits: Logits, fake_logits: Logits) -> Array:
  """Discriminator side of eq. (7), from logits (D has no sigmoid):

      L_GAN = E_y[log D(y)] + E_f[log(1 - D(G(f)))]      (7), maximised by D,

  i.e. D minimises ``-log D(y) - log(1 - D(G)) = softplus(-real) + softplus(fake)``
  with ``D = sigmoid(logits)``. Means over elements per branch, summed over
  branches (a multi-scale discriminator gives one logits array per scale).

  Returns:
    A float32 scalar (the weight lambda_0 is applied by ``discriminator_objective``).
  """
  real, fake = _branches(real_logits, fake_logits)
  return sum(jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))
             for r, f in zip(real, fake))


def nsgan_g_loss(fake_logits: Logits) -> Array:
  """Generator side of eq. (7), non-saturating form, from logits:

      -log D(G(f)) = softplus(-fake)

  instead of the paper's ``log(1 - D(G(f)))`` (minimised by G). Both have the same
  fixed point (D(G) = 1/2 at the optimal D), but ``log(1 - D)`` saturates when D
  confidently rejects early fakes, while ``-log D`` gives usable gradients then.
  Means over elements per branch, summed over branches.

  Returns:
    A float32 scalar, >= 0 (lambda_0 is applied by ``generator_objective``).
  """
  return sum(jnp.mean(jax.nn.softplus(-f))
             for f in _as_list(fake_logits, "fake_logits"))


def lsgan_d_loss(real_logits: Logits, fake_logits: Logits) -> Array:
  """Least-squares discriminator loss (UNIT's form of the adversarial term of eq. (7)):

      (D(y) - 1)^2 + D(G(f))^2

  on raw outputs. Means over elements per branch, summed over branches.
  """
  real, fake = _branches(real_logits, fake_logits)
  return sum(jnp.mean((r - 1.0)**2) + jnp.mean(f**2) for r, f in zip(real, fake))


def lsgan_g_loss(fake_logits: Logits) -> Array:
  """Least-squares generator loss (UNIT's form of eq. (7)): ``(D(G(f)) - 1)^2``.

  Means over elements per branch, summed over branches.
  """
  return sum(jnp.mean((f - 1.0)**2) for f in _as_list(fake_logits, "fake_logits"))


def gan_d_loss(kind: str, real_logits: Logits, fake_logits: Logits) -> Array:
  """Discriminator loss of eq. (7) in the form ``kind`` (one of ``GAN_KINDS``)."""
  _check_choice(kind, "kind", GAN_KINDS)
  if kind == "nsgan":
    return nsgan_d_loss(real_logits, fake_logits)
  return lsgan_d_loss(real_logits, fake_logits)


def gan_g_loss(kind: str, fake_logits: Logits) -> Array:
  """Generator loss of eq. (7) in the form ``kind`` (one of ``GAN_KINDS``)."""
  _check_choice(kind, "kind", GAN_KINDS)
  if kind == "nsgan":
    return nsgan_g_loss(fake_logits)
  return lsgan_g_loss(fake_logits)


def r1_penalty(grad_real: Array) -> Array:
  """R1 gradient penalty (Mescheder et al. 2018) on real samples:

      R1 = 1/2 E_y[ ||grad_y D(y)||^2 ]

  ``grad_real`` is the gradient of D's summed logits (all branches) with respect
  to the real batch, e.g. ``jax.grad(lambda y: sum(l.sum() for l in D(y)))(y)``;
  the squares are summed over all axes but axis 0 (the batch) and averaged over
  the batch. This is the penalty we chose for the paper's training "with gradient
  penalization" (sec. 4), which does not name one; it is applied to real samples
  only and weighted by gamma from the config (``discriminator_objective``'s
  ``gp_weight``).

  Returns:
    A float32 scalar, >= 0.
  """
  g = _f32(grad_real)
  if g.ndim < 1:
    raise ValueError(
        f"grad_real must have a batch axis 0 (the shape of the real batch), got a "
        f"scalar")
  per_sample = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
  return 0.5 * jnp.mean(per_sample)


# --------------------------------------------------------------------------- CC


def cycle_losses(x: Array, layers_pred: Sequence[Array], x_rec: Array,
                 layers_cycle: Sequence[Array], *, lambda_x: float,
                 lambda_layers: Sequence[float]) -> Dict[str, Array]:
  """Cycle-consistency losses L_CC, eq. (8), generalised to N layers:

      L_CC_x = lambda_4 |y' + z' - x|
      L_CC_y = lambda_5 |G_y(E_y(y' + z')) - y'|
      L_CC_z = lambda_6 |G_z(E_z(y' + z')) - z'|                               (8)

  with ``|.|`` the mean absolute difference and ``y' + z'`` the task's blend
  ``x_rec`` (computed by the caller with ``sils_jax.blend.compose``).

  Args:
    x: the input mixture.
    layers_pred: N predicted layers ``y'_k = G_k(E_k(x))``.
    x_rec: the blend of ``layers_pred``.
    layers_cycle: N arrays ``G_k(E_k(x_rec))``.
    lambda_x: weight of the reconstruction term (paper: lambda_4).
    lambda_layers: N weights (paper: lambda_5, lambda_6).

  Returns:
    ``{"cc_x", "cc_0", ..., "cc_{N-1}", "cc"}``: weighted terms and their sum.
  """
  n = _length(layers_pred, "layers_pred")
  if _length(layers_cycle, "layers_cycle") != n:
    raise ValueError(
        f"layers_cycle must hold one array per layer like layers_pred ({n}), "
        f"got {len(layers_cycle)}")
  if _length(lambda_layers, "lambda_layers") != n:
    raise ValueError(
        f"lambda_layers must hold one weight per layer ({n}), got {len(lambda_layers)}")
  out = {"cc_x": _f32(lambda_x) * l1_distance(x_rec, x)}
  for k in range(n):
    out[f"cc_{k}"] = _f32(lambda_layers[k]) * l1_distance(layers_cycle[k],
                                                           layers_pred[k])
  out["cc"] = sum(out[f"cc_{k}"] for k in range(n)) + out["cc_x"]
  return out


# ---------------------------------------------------------------------- remix


def remix_loss(layers_pred: Array, layers_real: Array) -> Array:
  """The remix term (Neural Egg Separation, Halperin et al., ICML 2019), not in the paper:

      L_remix = | G(E(y_1 ⊕ ... ⊕ y_N)) - (y_1, ..., y_N) |

  The batch holds unpaired real samples y_k of every layer; their blend
  ``compose(y_1, ..., y_N)`` (computed by the caller with ``sils_jax.blend.compose``)
  is a mixture whose layers are known, so separating it is trained with a mean L1
  distance to those samples. No triplet of the training data is used; it works for
  any N and either blend mode.

  Args:
    layers_pred: [B, N, H, W, C], the generator's layers of the blended samples.
    layers_real: [B, N, H, W, C], the samples that were blended.

  Returns:
    A float32 scalar, >= 0.
  """
  pred, real = _f32(layers_pred), _f32(layers_real)
  if pred.shape != real.shape:
    raise ValueError(f"layers_pred {pred.shape} and layers_real {real.shape} must have the same shape")
  return l1_distance(pred, real)


# --------------------------------------------------------------------- totals


def generator_objective(ss: Array, gan_g: Array, cc: Array, *, lambda0: float,
                        w1: float = 1.0, w2: float = 1.0, remix: Array = 0.0,
                        remix_weight: float = 0.0) -> Array:
  """Generator (E, G) side of eq. (9): ``w1 L_SS + L_GAN + w2 L_CC``.

      min_{E,G} max_D  w1 L_SS + L_GAN + w2 L_CC                               (9)

  with lambda_0 of eq. (7) applied here: ``w1 * ss + lambda0 * gan_g + w2 * cc``.
  (Paper: lambda_0 = 5; w1 = 1, w2 = 10 were found best in sec. 5.2.) Beside the
  paper: ``+ remix_weight * remix`` (``remix_loss``; 0 in the paper's method).
  """
  return (_f32(w1) * _f32(ss) + _f32(lambda0) * _f32(gan_g) + _f32(w2) * _f32(cc)
          + _f32(remix_weight) * _f32(remix))


def discriminator_objective(gan_d: Array, *, lambda0: float, gp: Array = 0.0,
                            gp_weight: float = 0.0) -> Array:
  """Discriminator side of eq. (9) (only L_GAN depends on D), plus the penalty:

      lambda0 * gan_d + gp_weight * gp

  where ``gan_d`` is the discriminator loss of eq. (7) (minimised form) and ``gp``
  e.g. ``r1_penalty`` weighted by gamma.
  """
  return _f32(lambda0) * _f32(gan_d) + _f32(gp_weight) * _f32(gp)
