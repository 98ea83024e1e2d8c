"""The train step (generator update, then discriminator update) and prediction.

Sec. 4: "a gradient descent step first updates E_Y, E_Z, G_Y and G_Z with fixed
D_Y and D_Z, then another gradient descent step updates D_Y and D_Z with fixed
E_Y, E_Z, G_Y and G_Z." The discriminator step reuses the fake layers of the
generator pass (computed with the pre-update generator, as CycleGAN does); a
second generator forward pass would double the cost of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sils_jax import blend, losses
from sils_jax.training.state import AXIS

GP_LOGITS = ("sum", "mean")  # what R1 differentiates per image (LossConfig.gp_logits)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The hyper-parameters of eqs. (5)-(9), hashable so the step can close over it."""
  blend_mode: str
  gan_loss: str
  lambda0: float
  lambda_intra: tuple[float, ...]
  lambda_inter: float
  lambda_cycle_x: float
  lambda_cycle_layers: tuple[float, ...]
  alpha: float
  w1: float
  w2: float
  ss_mode: str
  ss_levels: tuple[int, ...]
  ss_scale: float
  gp_weight: float
  objective: str = "unsupervised"  # or 'supervised': L1 to paired ground truth (upper bound)
  # R1 on the gradient of D's 'sum' of patch logits per image, or of their 'mean' (R1
  # as for one scalar D output per image: the sum form's penalty over (h*w)^2 per branch)
  gp_logits: str = "sum"
  remix_weight: float = 0.0  # weight of losses.remix_loss (not in the paper; 0 there)

  @property
  def uses_gan(self) -> bool:
    """Whether the GAN terms count (lambda0 > 0): else D is neither run nor trained."""
    return self.lambda0 != 0

  @classmethod
  def from_config(cls, config) -> "LossConfig":
    return cls(
        blend_mode=config.blend_mode, gan_loss=config.gan_loss, lambda0=float(config.lambda0),
        lambda_intra=tuple(float(v) for v in config.lambda_intra),
        lambda_inter=float(config.lambda_inter), lambda_cycle_x=float(config.lambda_cycle_x),
        lambda_cycle_layers=tuple(float(v) for v in config.lambda_cycle_layers),
        alpha=float(config.alpha), w1=float(config.w1), w2=float(config.w2), ss_mode=config.ss_mode,
        ss_levels=tuple(int(l) for l in config.ss_levels), ss_scale=float(config.ss_scale),
        gp_weight=float(config.gp_weight), objective=config.objective,
        gp_logits=config.gp_logits, remix_weight=float(config.remix_weight))


def _levels(codes: list[list[jax.Array]], levels: tuple[int, ...]) -> list[Any]:
  picked = [[c[l] for l in levels] for c in codes]
  return [p[0] if len(p) == 1 else p for p in picked]


def _unstack(layers: jax.Array) -> list[jax.Array]:
  return [layers[:, k] for k in range(layers.shape[1])]


def generator_loss(g_params, g_state, d_params, d_apply, batch, cfg: LossConfig):
  """Eq. (9), generator side: w1 L_SS + λ0 L_GAN + w2 L_CC (λ4..λ6 inside L_CC), plus
  ``remix_weight`` L_remix beside the paper. A term whose weight is 0 is not computed
  (it would add exactly 0), so 'remix alone' costs one generator pass."""
  x, real_layers = batch["x"], batch["layers"]
  stats = g_state.batch_stats

  def run(method, inp):
    nonlocal stats
    out, upd = g_state.apply_fn({"params": g_params, "batch_stats": stats}, inp, train=True,
                                method=method, mutable=["batch_stats"])
    stats = upd["batch_stats"]
    return out

  zero = jnp.zeros((), jnp.float32)
  metrics = {}
  preds = jnp.zeros_like(real_layers)  # unused when only the remix term counts
  if cfg.w1 != 0 or cfg.uses_gan or cfg.w2 != 0:
    codes_x, preds = run("separate", x)  # f_k = E_k(x), y'_k = G_k(f_k)
  ss = {"ss": zero}
  if cfg.w1 != 0:
    codes_layers = run("encode_layers", real_layers)  # E_k(y_k), unpaired y_k
    ss = losses.ss_loss(_levels(codes_x, cfg.ss_levels), _levels(codes_layers, cfg.ss_levels),
                        lambda_intra=cfg.lambda_intra, lambda_inter=cfg.lambda_inter, alpha=cfg.alpha,
                        mode=cfg.ss_mode, scale=cfg.ss_scale)
    metrics.update(ss)
  gan_g = zero
  if cfg.uses_gan:
    fake_logits = d_apply({"params": d_params}, preds)
    gan_terms = [losses.gan_g_loss(cfg.gan_loss, fl) for fl in fake_logits]
    gan_g = sum(gan_terms)
    metrics["gan_g"] = gan_g
    for k, t in enumerate(gan_terms):
      metrics[f"gan_g_{k}"] = t
  cc = {"cc": zero}
  if cfg.w2 != 0:
    x_rec = blend.compose(jnp.moveaxis(preds, 1, 0), cfg.blend_mode)  # x' = y' ⊕ z'
    _, cycles = run("separate", x_rec)  # G_k(E_k(x'))
    cc = losses.cycle_losses(x, _unstack(preds), x_rec, _unstack(cycles), lambda_x=cfg.lambda_cycle_x,
                             lambda_layers=cfg.lambda_cycle_layers)
    metrics.update(cc)
  remix = zero
  if cfg.remix_weight != 0:
    # the blend of the batch's unpaired layer samples: a mixture with known layers
    x_mix = blend.compose(jnp.moveaxis(real_layers, 1, 0), cfg.blend_mode)
    _, remixed = run("separate", x_mix)
    remix = losses.remix_loss(remixed, real_layers)
    metrics["remix"] = remix
  total = losses.generator_objective(ss["ss"], gan_g, cc["cc"], lambda0=cfg.lambda0, w1=cfg.w1, w2=cfg.w2,
                                     remix=remix, remix_weight=cfg.remix_weight)
  metrics["g_total"] = total
  return total, (metrics, stats, preds)


def supervised_loss(g_params, g_state, batch):
  """The supervised upper bound: the same generator, L1 to the paired ground-truth layers."""
  (_, preds), upd = g_state.apply_fn({"params": g_params, "batch_stats": g_state.batch_stats},
                                     batch["x"], train=True, method="separate", mutable=["batch_stats"])
  l1 = jnp.mean(jnp.abs(preds - batch["layers"]))
  return l1, ({"l1": l1, "g_total": l1}, upd["batch_stats"], preds)


def discriminator_loss(d_params, d_apply, real_layers, fake_layers, cfg: LossConfig):
  """Eq. (7), discriminator side, plus the R1 gradient penalty on real layers."""
  real_logits = d_apply({"params": d_params}, real_layers)
  fake_logits = d_apply({"params": d_params}, fake_layers)
  terms = [losses.gan_d_loss(cfg.gan_loss, r, f) for r, f in zip(real_logits, fake_logits)]
  gan_d = sum(terms)
  metrics = {"gan_d": gan_d}
  for k, t in enumerate(terms):
    metrics[f"gan_d_{k}"] = t
    metrics.update(_d_accuracies(k, real_logits[k], fake_logits[k]))
  gp = jnp.zeros(())
  if cfg.gp_weight > 0:
    if cfg.gp_logits not in GP_LOGITS:
      raise ValueError(f"gp_logits must be one of {GP_LOGITS}, got {cfg.gp_logits!r}")

    def reduce(logits):  # one branch's [B, h, w, 1] patch logits, summed over the batch
      per_image = 1.0 if cfg.gp_logits == "sum" else 1.0 / (logits.shape[1] * logits.shape[2])
      return jnp.sum(logits) * per_image

    def summed_logits(r):
      return sum(reduce(l) for branches in d_apply({"params": d_params}, r) for l in branches)
    grad_real = jax.grad(summed_logits)(real_layers)
    gp = sum(losses.r1_penalty(grad_real[:, k]) for k in range(real_layers.shape[1]))
  metrics["r1"] = gp
  total = losses.discriminator_objective(gan_d, lambda0=cfg.lambda0, gp=gp, gp_weight=cfg.gp_weight)
  metrics["d_total"] = total
  return total, metrics


def _d_accuracies(k: int, real: list[jax.Array], fake: list[jax.Array]) -> dict[str, jax.Array]:
  """Diagnostics of D_k (all branches): the share of patch logits on the right side of 0
  for real and for fake layers, and the same for each image's mean logit. 0.5 is chance;
  a D at chance gives the generator no signal."""
  def share(branches, sign, per_image):  # mean over branches of the share with sign * logit > 0
    scores = [jnp.mean(l, axis=(1, 2, 3)) if per_image else l for l in branches]
    return jnp.mean(jnp.stack([jnp.mean((sign * v > 0).astype(jnp.float32)) for v in scores]))

  return {f"d{k}_acc_real": share(real, 1.0, False), f"d{k}_acc_fake": share(fake, -1.0, False),
          f"d{k}_acc_real_image": share(real, 1.0, True), f"d{k}_acc_fake_image": share(fake, -1.0, True)}


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def train_step(g_state, d_state, batch, cfg: LossConfig):
  """One generator update then one discriminator update; call under pmap(axis_name='batch').

  batch: {'x': [b, H, W, 3], 'layers': [b, N, H, W, 3]} per device; x and the
  layers are unpaired. Gradients, BatchNorm statistics and metrics are averaged
  over the devices, so N devices x b images equal one device with N*b images.
  With ``cfg.objective == 'supervised'`` the batch is paired, the generator learns
  from L1 to the true layers and the discriminator is left as it is.
  """
  supervised = cfg.objective == "supervised"  # paired batch; no discriminator
  if supervised:
    (_, (g_metrics, new_stats, _)), g_grads = jax.value_and_grad(supervised_loss, has_aux=True)(
        g_state.params, g_state, batch)
  else:
    (_, (g_metrics, new_stats, preds)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
        g_state.params, g_state, d_state.params, d_state.apply_fn, batch, cfg)
  g_grads = jax.lax.pmean(g_grads, AXIS)
  new_stats = jax.lax.pmean(new_stats, AXIS)
  metrics = {**g_metrics, "g_grad_norm": _global_norm(g_grads)}

  d_grads = None
  if not supervised and cfg.uses_gan:
    # The discriminator's gradient uses the pre-update generator's layers, so it does
    # not depend on the generator update; both updates are applied together below.
    fakes = jax.lax.stop_gradient(preds)
    (_, d_metrics), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        d_state.params, d_state.apply_fn, batch["layers"], fakes, cfg)
    d_grads = jax.lax.pmean(d_grads, AXIS)
    metrics.update(d_metrics, d_grad_norm=_global_norm(d_grads))

  metrics = jax.lax.pmean(metrics, AXIS)
  # NaN/inf guard: every loss term and both gradient norms (a non-finite gradient
  # makes its norm non-finite) are checked here, on device, for the price of a few
  # scalar compares. A bad step leaves both states as they were, so nothing
  # non-finite can reach a checkpoint; the loop reads `finite` and stops.
  finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in jax.tree.leaves(metrics)]))

  def update(states):
    g, d = states
    g = g.apply_gradients(grads=g_grads, batch_stats=new_stats)
    return g, (d if d_grads is None else d.apply_gradients(grads=d_grads))

  if jax.default_backend() == "cpu":
    # A `cond`: the updates are written straight into the (donated) state buffers. A
    # `where` over every leaf made XLA:CPU keep a copy of each old parameter and moment
    # for the select (338 copies, 302 selects per step; ~4% of the step at batch 1).
    new_g, new_d = jax.lax.cond(finite, update, lambda states: states, (g_state, d_state))
  else:
    # On GPU/TPU a conditional reads its predicate on the host: one sync per step. The
    # select costs a pass over the states at device bandwidth instead (the measured form).
    new_g, new_d = jax.tree.map(lambda a, b: jnp.where(finite, a, b), update((g_state, d_state)),
                                (g_state, d_state))
  metrics["finite"] = finite.astype(jnp.float32)
  return new_g, new_d, metrics


def predict(model, params, batch_stats, x: jax.Array, *, norm_stats: str, method: str = "__call__"):
  """Runs the generator in inference mode: by default the separated layers
  [B, N, H, W, 3] of images x [B, H, W, 3] in [0, 1]; ``method`` picks another
  entry point of the model ('encode', 'encode_layers') with the same input layout.

  ``model`` must be built with ``bn_axis_name=None``. norm_stats='running' uses
  the BatchNorm running averages; 'per_image' normalises every image with its own
  statistics, exactly as training with one image per batch does.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if norm_stats == "running":
    return model.apply(variables, x, train=False, method=method)

  def one(xi):
    out, _ = model.apply(variables, xi[None], train=True, method=method, mutable=["batch_stats"])
    return jax.tree.map(lambda a: a[0], out)
  return jax.vmap(one)(x)
