"""A PyTorch peer of the synthetic-data train step, to benchmark JAX against PyTorch.

  python benchmarks/torch_reference.py --image_size=128 --batch=8 --steps=20 --warmup=3 \
      [--compile] [--layers=2] [--device=cpu|cuda] [--threads=N] [--channels_last=auto|on|off]
  python benchmarks/torch_reference.py --check [--cpu_kernels=off|auto]   # same losses as sils_jax

Benchmark mode prints one JSON object per line (keys: framework, torch_version, mode,
device, config, batch, image_size, num_layers, steps, img_per_s, ms_per_step,
ms_per_step_p10, ms_per_step_p90, compile_s, peak_mem_bytes, ...). ``--check`` builds
our JAX G and D (``sils_jax.training.state.create_states``; by default with flax's
``nn.Conv`` / ``nn.ConvTranspose``, ``config.cpu_kernels='off'``, or with the CPU forms
that training runs on a CPU, ``--cpu_kernels=auto``), copies their parameters
into the torch modules, and prints the largest differences between the torch losses and
gradient norms and those of ``sils_jax.training.step.generator_loss`` /
``discriminator_loss``, before and after one Adam step of both.

torch is imported only by this script: it is no dependency of ``sils_jax``, and this
script imports ``sils_jax`` only in ``--check``.

What is mirrored (file by file):
  * ``sils_jax/models/unet.py``: E = five 4x4 stride-2 convs (16..256) without bias,
    BatchNorm (flax momentum 0.9 == torch momentum 0.1, eps 1e-5), leaky ReLU 0.2, input
    mapped to [-1, 1]; G = 4x4 stride-2 up-convs (128, 64, 32, 16, 16), each but the
    first after concatenating the encoder feature of the same resolution, BN + leaky
    ReLU, then a 3x3 conv to 3 channels with bias and no output activation.
  * the up-convs: flax ``ConvTranspose(F, (4, 4), (2, 2), 'SAME')`` (the models' default;
    ``sils_jax/cpu_kernels/upconv.py``'s phase form on the CPU computes the same with the
    same (4, 4, Cin, F) kernel and FLOPs) is torch ``ConvTranspose2d(k=4, s=2, p=1)``
    with the kernel flipped in space and its in/out axes swapped (``--check`` verifies
    this numerically).
  * ``sils_jax/models/discriminator.py``: one D per layer; per branch four 4x4 stride-2
    convs (32, 64, 128, 32) with bias and leaky ReLU, a 1x1 conv to one logit channel;
    UNIT's AvgPool(3, 2, 1, count_include_pad=False) between branches.
  * ``sils_jax/losses.py`` and ``sils_jax/training/step.py``: the generator objective
    w1 L_SS + lambda0 L_GAN + w2 L_CC over three generator passes in train mode
    (separate(x), encode_layers(y), separate(x_rec)), then the discriminator objective
    lambda0 L_GAN_D + gamma R1 on the generator pass's detached fakes.
  * ``sils_jax/training/state.py``: Adam, lr 1e-4, betas (0.0, 0.9), eps 1e-8 (optax's).
  * ``configs/synthetic.py``: every default of ``HParams``.

Idiomatic torch choices that do not change the maths: D's parameters are frozen
(``requires_grad_(False)``) during the generator update, as CycleGAN's code does (JAX
differentiates w.r.t. G's parameters only, so XLA computes no D weight gradients either);
the R1 penalty reuses the real-layer logits of the GAN term (``create_graph=True``)
where the JAX code calls D on the real layers again (XLA can share that forward pass).

Findings (torch 2.13.0+cpu on our 2-core x86 development machine, shared and noisy;
torch 2.11.0+cu130 on an NVIDIA H200 machine with 16 CPU cores; 2026-11):
  * channels_last, eager: on CPU it is faster at batch 8 (128x128 on the 16-core host:
    201 against 231 ms per step; 64x64 on 2 cores: 299 against 317 ms); at batch 1 on
    2 cores (64x64) the shared machine was too noisy to tell (medians of repeated runs:
    93-138 ms NCHW, 110-169 ms channels_last); on the H200 it does not help
    (128x128, batch 8: 39.8 against 39.7 ms; batch 64: 57.4 against 54.9 ms). So
    ``--channels_last=auto`` means on for CPU and off for CUDA (CHANNELS_LAST_AUTO); the
    JSON line says which layout ran.
  * torch.compile (inductor) compiles the generator loss (three G passes, D on the
    fakes, all losses) into one graph with its backward. The discriminator loss stays
    eager: its R1 term needs a double backward, which AOTAutograd does not support.
    On 2 CPU cores the first step took 132 s to compile (64x64, batch 1) and the steps
    were not faster than eager (142 against ~120 ms, noisy). On the AVX-512 cores of
    2026-12-07 (128x128, alternated with eager in one run,
    results/cpu_torch_compile_2026-12-07.jsonl) compiled steps were slower than eager:
    531 / 565 against 438 / 462 ms at batch 8, 128 / 110 against 116 / 99 ms at
    batch 1. On the H200 (128x128, batch 8) compiling took ~61-66 s and gave 36.9 ms per step in NCHW (43.4 ms in
    channels_last) against 39.7 ms eager: at this size the step is bound by kernel
    launches, not by FLOPs (another H200 run gave 32.5 ms eager; compare only numbers
    from one machine and one run).
  * the up-conv as a sub-pixel 3x3 conv to 4F channels + ``pixel_shuffle`` (a form the
    JAX side had then, 9/4 of the up-convs' FLOPs; since removed from both) was much
    slower in torch: 632 against 260 ms per step on 2 CPU cores (64x64, batch 8) and
    51.3 against 32.5 ms on the H200 (128x128, batch 8). torch's ConvTranspose2d has no
    slow weight gradient to avoid, so it is the fair idiomatic peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import sys
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Layout chosen by --channels_last=auto, per device type; measured, see the docstring.
CHANNELS_LAST_AUTO = {"cpu": True, "cuda": False}


@dataclasses.dataclass(frozen=True)
class HParams:
  """The defaults of ``configs/synthetic.py`` that the train step reads."""
  num_layers: int = 2
  image_size: int = 128
  encoder_features: tuple[int, ...] = (16, 32, 64, 128, 256)
  decoder_features: tuple[int, ...] = (128, 64, 32, 16, 16)
  disc_branches: int = 1
  disc_features: tuple[int, ...] = (32, 64, 128, 32)
  blend_mode: str = "additive"
  lambda0: float = 5.0
  lambda_intra: tuple[float, ...] = (0.5, 0.5)
  lambda_inter: float = 1.0
  lambda_cycle_x: float = 10.0
  lambda_cycle_layers: tuple[float, ...] = (10.0, 10.0)
  alpha: float = 1.4
  w1: float = 1.0
  w2: float = 1.0
  ss_levels: tuple[int, ...] = (4,)  # SS on the latent code (last encoder level), 'elementwise'
  gp_weight: float = 1.0
  learning_rate: float = 1e-4
  b1: float = 0.0
  b2: float = 0.9

  @classmethod
  def synthetic(cls, num_layers: int, image_size: int) -> "HParams":
    """The synthetic config with ``num_layers`` layers (per-layer weights repeated)."""
    return cls(num_layers=num_layers, image_size=image_size, lambda_intra=(0.5,) * num_layers,
               lambda_cycle_layers=(10.0,) * num_layers)

  @classmethod
  def from_jax_config(cls, c) -> "HParams":
    """From a sils_jax ml_collections config (``--check``); only what this peer supports."""
    unsupported = {"norm": (c.norm, "batch"), "generator": (c.generator, "unet"),
                   "output_activation": (c.output_activation, "none"), "gan_loss": (c.gan_loss, "nsgan"),
                   "ss_mode": (c.ss_mode, "elementwise"), "lr_schedule": (c.lr_schedule, "constant"),
                   "compute_dtype": (c.compute_dtype, "float32"), "objective": (c.objective, "unsupervised")}
    for name, (value, ok) in unsupported.items():
      if value not in (ok if isinstance(ok, tuple) else (ok,)):
        raise ValueError(f"the torch peer supports config.{name} = {ok!r} only, got {value!r}")
    return cls(num_layers=len(c.layer_names), image_size=c.image_size,
               encoder_features=tuple(c.encoder_features), decoder_features=tuple(c.decoder_features),
               disc_branches=c.disc_branches, disc_features=tuple(c.disc_features), blend_mode=c.blend_mode,
               lambda0=c.lambda0, lambda_intra=tuple(c.lambda_intra), lambda_inter=c.lambda_inter,
               lambda_cycle_x=c.lambda_cycle_x, lambda_cycle_layers=tuple(c.lambda_cycle_layers),
               alpha=c.alpha, w1=c.w1, w2=c.w2, ss_levels=tuple(c.ss_levels), gp_weight=c.gp_weight,
               learning_rate=c.learning_rate, b1=c.b1, b2=c.b2)


# ------------------------------------------------------------------------ models


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
  """flax's default kernel init ``lecun_normal``: truncated normal (at +-2 std) whose
  variance is 1 / fan_in (the std is corrected for the truncation)."""
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def batch_norm(features: int) -> nn.BatchNorm2d:
  """unet.py make_norm('batch'): flax momentum 0.9 (weight of the old average) is torch
  momentum 0.1 (weight of the new batch); eps 1e-5. In train mode both normalise with
  the biased batch variance (torch keeps the unbiased one in its running average; no loss
  reads the running averages)."""
  return nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)


class Encoder(nn.Module):
  """unet.py Encoder: returns every level's feature map; the last is the latent code."""

  def __init__(self, features: Sequence[int]):
    super().__init__()
    chans = [3, *features]
    # a bias before BatchNorm is removed by it: none (as in unet.py)
    self.convs = nn.ModuleList(nn.Conv2d(chans[i], f, 4, stride=2, padding=1, bias=False)
                               for i, f in enumerate(features))
    self.norms = nn.ModuleList(batch_norm(f) for f in features)
    for conv in self.convs:
      lecun_normal_(conv.weight, conv.weight[0].numel())

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    h = x * 2.0 - 1.0  # images in [0, 1] -> [-1, 1]
    feats = []
    for conv, norm in zip(self.convs, self.norms):
      h = F.leaky_relu(norm(conv(h)), 0.2)
      feats.append(h)
    return feats


def upsample_conv(cin: int, features: int) -> nn.ConvTranspose2d:
  """unet.py's up-conv: a 4x4 stride-2 transposed conv without bias (BN follows).

  flax ConvTranspose(F, (4, 4), (2, 2), 'SAME') == ConvTranspose2d(k=4, s=2, p=1): both
  map HxW to 2Hx2W, padding the stride-dilated input by 2 on each side.
  """
  return nn.ConvTranspose2d(cin, features, 4, stride=2, padding=1, bias=False)


class Decoder(nn.Module):
  """unet.py Decoder: up-convs with U-Net mirror links, then a 3x3 conv to 3 channels."""

  def __init__(self, encoder_features: Sequence[int], features: Sequence[int]):
    super().__init__()
    if len(encoder_features) != len(features):
      raise ValueError(f"Decoder has {len(features)} levels but the encoder {len(encoder_features)}")
    enc = list(encoder_features)
    # up-conv i sees the previous up-conv's output concatenated with encoder level -1-i
    cins = [enc[-1]] + [features[i - 1] + enc[-1 - i] for i in range(1, len(features))]
    self.ups = nn.ModuleList(upsample_conv(c, f) for c, f in zip(cins, features))
    self.norms = nn.ModuleList(batch_norm(f) for f in features)
    self.out = nn.Conv2d(features[-1], 3, 3, padding=1, bias=True)
    for up, cin in zip(self.ups, cins):
      lecun_normal_(up.weight, 16 * cin)  # flax's fan_in of a (4, 4, Cin, F) kernel
    lecun_normal_(self.out.weight, self.out.weight[0].numel())
    nn.init.zeros_(self.out.bias)

  def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    h = feats[-1]
    for i, (up, norm) in enumerate(zip(self.ups, self.norms)):
      if i > 0:  # mirror link: the encoder feature of the same resolution
        h = torch.cat([h, feats[-1 - i]], dim=1)
      h = F.leaky_relu(norm(up(h)), 0.2)
    return self.out(h)  # output_activation 'none'


class LayerSeparator(nn.Module):
  """separator.py LayerSeparator: N independent streams E_k, G_k."""

  def __init__(self, hp: HParams):
    super().__init__()
    self.encoders = nn.ModuleList(Encoder(hp.encoder_features) for _ in range(hp.num_layers))
    self.decoders = nn.ModuleList(Decoder(hp.encoder_features, hp.decoder_features)
                                  for _ in range(hp.num_layers))

  def separate(self, x: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """(codes E_k(x), layers G_k(E_k(x))), one entry per stream."""
    codes = [e(x) for e in self.encoders]
    return codes, [g(c) for g, c in zip(self.decoders, codes)]

  def encode_layers(self, layers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """E_k(y_k): stream k encodes layer image k."""
    return [e(y) for e, y in zip(self.encoders, layers)]


class Discriminator(nn.Module):
  """discriminator.py Discriminator: per branch, a list of [B, 1, h, w] logits."""

  def __init__(self, num_branches: int, features: Sequence[int]):
    super().__init__()
    chans = [3, *features]
    self.branches = nn.ModuleList(
        nn.ModuleList([nn.Conv2d(chans[i], f, 4, stride=2, padding=1) for i, f in enumerate(features)]
                      + [nn.Conv2d(features[-1], 1, 1)])
        for _ in range(num_branches))
    for conv in self.modules():
      if isinstance(conv, nn.Conv2d):  # kernel_init normal(0.02), flax's zero bias
        nn.init.normal_(conv.weight, std=0.02)
        nn.init.zeros_(conv.bias)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    h_in = x * 2.0 - 1.0
    outs = []
    for b, convs in enumerate(self.branches):
      if b > 0:  # UNIT's downsampling between branches
        h_in = F.avg_pool2d(h_in, 3, stride=2, padding=1, count_include_pad=False)
      h = h_in
      for conv in convs[:-1]:
        h = F.leaky_relu(conv(h), 0.2)
      outs.append(convs[-1](h))
    return outs


class LayerDiscriminators(nn.Module):
  """discriminator.py LayerDiscriminators: D_1..D_N, unshared parameters."""

  def __init__(self, hp: HParams):
    super().__init__()
    self.discs = nn.ModuleList(Discriminator(hp.disc_branches, hp.disc_features)
                               for _ in range(hp.num_layers))

  def forward(self, layers: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [d(y) for d, y in zip(self.discs, layers)]


# ------------------------------------------------------------------------ losses (losses.py)


def compose(layers: Sequence[torch.Tensor], mode: str, eps: float = 1e-4) -> torch.Tensor:
  """blend.py compose: sum (additive) or product of max(L, eps) (multiplicative)."""
  if mode == "additive":
    return sum(layers[1:], layers[0])
  if mode == "multiplicative":
    out = layers[0].clamp_min(eps)
    for layer in layers[1:]:
      out = out * layer.clamp_min(eps)
    return out
  raise ValueError(f"blend_mode must be 'additive' or 'multiplicative', got {mode!r}")


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """d_phi of eq. (5): mean |a - b|."""
  return (a - b).abs().mean()


def ss_loss(codes_x, codes_layers, hp: HParams) -> dict[str, torch.Tensor]:
  """losses.ss_loss, mode 'elementwise', on the levels ``hp.ss_levels`` (eq. (5), (6))."""
  n, alpha = hp.num_layers, hp.alpha
  out = {}
  for k in range(n):
    d_phi = torch.stack([l1(codes_layers[k][l], codes_x[k][l]) for l in hp.ss_levels]).mean()
    out[f"ss_intra_{k}"] = hp.lambda_intra[k] * d_phi

  def one_minus_d_psi(a, b):  # 1 - d_psi = sigmoid(-(|a - b| - alpha e^alpha) / alpha^2)
    return torch.sigmoid(-((a - b).abs() - alpha * math.exp(alpha)) / alpha**2).mean()

  pairs = [torch.stack([one_minus_d_psi(codes_x[k][l], codes_x[m][l]) for l in hp.ss_levels]).mean()
           for k, m in itertools.combinations(range(n), 2)]
  out["ss_inter"] = hp.lambda_inter * torch.stack(pairs).mean()
  out["ss"] = sum(out[f"ss_intra_{k}"] for k in range(n)) + out["ss_inter"]
  return out


def nsgan_g_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
  """-log D(G) = softplus(-fake), mean per branch, summed over branches."""
  return sum(F.softplus(-f).mean() for f in fake_logits)


def nsgan_d_loss(real_logits, fake_logits) -> torch.Tensor:
  """-log D(y) - log(1 - D(G)) = softplus(-real) + softplus(fake), per branch, summed."""
  return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real_logits, fake_logits))


def r1_penalty(grad_real: torch.Tensor) -> torch.Tensor:
  """1/2 E_y ||grad_y D(y)||^2: squares summed per sample, averaged over the batch."""
  return 0.5 * grad_real.square().flatten(1).sum(1).mean()


# ------------------------------------------------------------------------ train step (step.py)


class GeneratorLoss(nn.Module):
  """step.py generator_loss: w1 L_SS + lambda0 L_GAN + w2 L_CC over three G passes.

  A module so that ``torch.compile`` can take the whole loss (and its backward) as one
  graph. Returns (total, metrics, preds); preds are the layers y'_k = G_k(E_k(x)).
  """

  def __init__(self, gen: LayerSeparator, disc: LayerDiscriminators, hp: HParams):
    super().__init__()
    self.gen, self.disc, self.hp = gen, disc, hp

  def forward(self, x: torch.Tensor, real_layers: Sequence[torch.Tensor]):
    hp = self.hp
    codes_x, preds = self.gen.separate(x)  # f_k = E_k(x), y'_k = G_k(f_k)
    codes_layers = self.gen.encode_layers(real_layers)  # E_k(y_k), unpaired y_k
    x_rec = compose(preds, hp.blend_mode)  # x' = y' ⊕ z'
    _, cycles = self.gen.separate(x_rec)  # G_k(E_k(x'))

    ss = ss_loss(codes_x, codes_layers, hp)
    gan_terms = [nsgan_g_loss(fl) for fl in self.disc(preds)]
    gan_g = sum(gan_terms)
    cc = {"cc_x": hp.lambda_cycle_x * l1(x_rec, x)}
    for k in range(hp.num_layers):
      cc[f"cc_{k}"] = hp.lambda_cycle_layers[k] * l1(cycles[k], preds[k])
    cc["cc"] = sum(cc[f"cc_{k}"] for k in range(hp.num_layers)) + cc["cc_x"]
    total = hp.w1 * ss["ss"] + hp.lambda0 * gan_g + hp.w2 * cc["cc"]
    metrics = {**ss, **cc, "gan_g": gan_g, "g_total": total}
    for k, t in enumerate(gan_terms):
      metrics[f"gan_g_{k}"] = t
    return total, metrics, preds


def discriminator_loss(disc: LayerDiscriminators, real_layers, fake_layers, hp: HParams):
  """step.py discriminator_loss: lambda0 L_GAN_D + gp_weight R1 (real layers only)."""
  reals = [y.detach().requires_grad_(hp.gp_weight > 0) for y in real_layers]
  real_logits = disc(reals)
  fake_logits = disc([f.detach() for f in fake_layers])
  terms = [nsgan_d_loss(r, f) for r, f in zip(real_logits, fake_logits)]
  gan_d = sum(terms)
  metrics = {"gan_d": gan_d}
  for k, t in enumerate(terms):
    metrics[f"gan_d_{k}"] = t
  r1 = torch.zeros((), device=gan_d.device)
  if hp.gp_weight > 0:
    # grad of D's summed logits (all layers, all branches) w.r.t. the real layers, kept
    # in the graph (double backward) so that the penalty trains D
    summed = sum(l.sum() for branches in real_logits for l in branches)
    grads = torch.autograd.grad(summed, reals, create_graph=True)
    r1 = sum(r1_penalty(g) for g in grads)
  metrics["r1"] = r1
  total = hp.lambda0 * gan_d + hp.gp_weight * r1
  metrics["d_total"] = total
  return total, metrics


def adam(params, hp: HParams) -> torch.optim.Adam:
  """state.py make_optimizer: Adam(lr, b1, b2), optax's eps 1e-8 (same update formula)."""
  return torch.optim.Adam(params, lr=hp.learning_rate, betas=(hp.b1, hp.b2), eps=1e-8)


def grad_norm(params) -> torch.Tensor:
  return torch.sqrt(sum(p.grad.square().sum() for p in params if p.grad is not None))


class Trainer:
  """G, D, their optimizers and ``train_step`` (step.py train_step, one device)."""

  def __init__(self, hp: HParams, device: torch.device, *, channels_last: bool = False,
               compile: bool = False, autocast: str = "off"):
    self.hp, self.device = hp, device
    # 'bf16': the losses' forward passes under torch.autocast(bfloat16), torch's mixed
    # precision (convs in bf16, reductions and losses in float32, weights float32),
    # the peer of sils_jax's compute_dtype='bfloat16'. Backward passes run outside it.
    self.autocast = autocast
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.gen = LayerSeparator(hp).to(device, memory_format=self.memory_format)
    self.disc = LayerDiscriminators(hp).to(device, memory_format=self.memory_format)
    self.g_loss = GeneratorLoss(self.gen, self.disc, hp)
    if compile:
      # The whole generator loss is one graph (AOTAutograd also compiles its backward).
      # discriminator_loss stays eager: its R1 double backward is not supported by
      # AOTAutograd ("torch.compile with aot_autograd does currently not support
      # double backward").
      self.g_loss = torch.compile(self.g_loss, fullgraph=True)
    self.g_opt = adam(self.gen.parameters(), hp)
    self.d_opt = adam(self.disc.parameters(), hp)

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16")

  def prepare(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """{'x': [B, 3, S, S], 'layers': [B, N, 3, S, S]} -> x and the N layer images, on
    device in the trainer's memory format."""
    x = batch["x"].to(self.device).contiguous(memory_format=self.memory_format)
    layers = [y.contiguous(memory_format=self.memory_format)
              for y in batch["layers"].to(self.device).unbind(1)]
    return x, layers

  def train_step(self, batch, *, with_grad_norms: bool = False) -> dict[str, float]:
    """One generator update with D fixed, then one D update on the generator's fakes."""
    x, layers = self.prepare(batch)
    self.disc.requires_grad_(False)  # D fixed: no D weight gradients in the G update
    with self._autocast():
      g_total, g_metrics, preds = self.g_loss(x, layers)
    self.g_opt.zero_grad(set_to_none=True)
    g_total.backward()
    norms = {"g_grad_norm": grad_norm(self.gen.parameters())} if with_grad_norms else {}
    self.g_opt.step()
    self.disc.requires_grad_(True)

    with self._autocast():
      d_total, d_metrics = discriminator_loss(self.disc, layers, [p.detach() for p in preds], self.hp)
    self.d_opt.zero_grad(set_to_none=True)
    d_total.backward()
    if with_grad_norms:
      norms["d_grad_norm"] = grad_norm(self.disc.parameters())
    self.d_opt.step()

    metrics = {**g_metrics, **d_metrics, **norms}
    values = torch.stack([v.detach().float() for v in metrics.values()]).tolist()  # one sync
    return dict(zip(metrics, values))


# ------------------------------------------------------------------------ benchmark


def random_batch(hp: HParams, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
  """Uniform [0, 1] x [B, 3, S, S] and unpaired layers [B, N, 3, S, S] (built once)."""
  gen = torch.Generator().manual_seed(seed)
  s = hp.image_size
  return {"x": torch.rand(batch, 3, s, s, generator=gen),
          "layers": torch.rand(batch, hp.num_layers, 3, s, s, generator=gen)}


def peak_memory_bytes(device: torch.device) -> int:
  if device.type == "cuda":
    return int(torch.cuda.max_memory_allocated(device))
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def benchmark(args) -> dict:
  device = torch.device(args.device)
  hp = HParams.synthetic(args.layers, args.image_size)
  channels_last = {"auto": CHANNELS_LAST_AUTO[device.type], "on": True, "off": False}[args.channels_last]
  torch.manual_seed(0)
  trainer = Trainer(hp, device, channels_last=channels_last, compile=args.compile, autocast=args.autocast)
  batch = {k: v.to(device) for k, v in random_batch(hp, args.batch).items()}

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  times = []
  sync()
  for _ in range(args.warmup + args.steps):
    t = time.perf_counter()
    metrics = trainer.train_step(batch)  # returns floats: already synchronised
    sync()
    times.append(time.perf_counter() - t)
  warm, timed = times[:args.warmup], np.array(times[args.warmup:]) * 1e3
  median = float(np.median(timed))
  return {
      "framework": "torch", "torch_version": torch.__version__,
      "mode": "compile" if args.compile else "eager",
      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
      "config": "synthetic", "batch": args.batch, "image_size": args.image_size,
      "num_layers": args.layers, "steps": args.steps, "warmup": args.warmup,
      "threads": torch.get_num_threads(), "channels_last": channels_last,
      "dtype": "bfloat16" if args.autocast == "bf16" else "float32",
      "img_per_s": args.batch / (median / 1e3),
      "ms_per_step": median,
      "ms_per_step_p10": float(np.percentile(timed, 10)),
      "ms_per_step_p90": float(np.percentile(timed, 90)),
      # compile mode: all warm-up steps (compilation and any recompilation);
      # eager: the first step (allocator and oneDNN/cuDNN primitive set-up)
      "compile_s": sum(warm or times[:1]) if args.compile else times[0],
      "first_step_s": times[0],
      "peak_mem_bytes": peak_memory_bytes(device),
      "final_g_total": metrics["g_total"], "final_d_total": metrics["d_total"],
  }


# ------------------------------------------------------------------------ check against JAX


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def conv_weight(kernel) -> torch.Tensor:
  """flax Conv kernel (kh, kw, Cin, Cout) -> torch Conv2d weight (Cout, Cin, kh, kw)."""
  return _t(kernel).permute(3, 2, 0, 1).contiguous()


def conv_transpose_weight(kernel) -> torch.Tensor:
  """flax ConvTranspose kernel (4, 4, Cin, F) -> torch ConvTranspose2d weight (Cin, F, 4, 4).

  flax (``transpose_kernel=False``) convolves the stride-dilated input with the kernel
  as it is; torch's ConvTranspose2d is the gradient of a conv, i.e. it convolves the
  dilated input with the kernel flipped in space, and stores it (Cin, Cout, kh, kw). So
  flip both spatial axes and move (Cin, F) to the front. The CPU phase form
  (sils_jax/cpu_kernels/upconv.py) reads the same (4, 4, Cin, F) kernel.
  """
  return _t(kernel).flip(0, 1).permute(2, 3, 0, 1).contiguous()


@torch.no_grad()
def load_jax_params(trainer: Trainer, g_params, d_params) -> None:
  """Copies our JAX G and D parameters (create_states) into the torch modules."""
  hp = trainer.hp
  for k in range(hp.num_layers):
    e, g = trainer.gen.encoders[k], trainer.gen.decoders[k]
    pe, pg = g_params[f"E{k}"], g_params[f"G{k}"]
    for i in range(len(hp.encoder_features)):
      e.convs[i].weight.copy_(conv_weight(pe[f"conv{i}"]["kernel"]))
      e.norms[i].weight.copy_(_t(pe[f"norm{i}"]["scale"]))
      e.norms[i].bias.copy_(_t(pe[f"norm{i}"]["bias"]))
    for i in range(len(hp.decoder_features)):
      g.ups[i].weight.copy_(conv_transpose_weight(pg[f"up{i}"]["kernel"]))
      g.norms[i].weight.copy_(_t(pg[f"norm{i}"]["scale"]))
      g.norms[i].bias.copy_(_t(pg[f"norm{i}"]["bias"]))
    g.out.weight.copy_(conv_weight(pg["out"]["kernel"]))
    g.out.bias.copy_(_t(pg["out"]["bias"]))
    pd = d_params[f"d{k}"]
    for b, convs in enumerate(trainer.disc.discs[k].branches):
      names = [f"branch{b}_conv{i}" for i in range(len(hp.disc_features))] + [f"branch{b}_logits"]
      for conv, name in zip(convs, names):
        conv.weight.copy_(conv_weight(pd[name]["kernel"]))
        conv.bias.copy_(_t(pd[name]["bias"]))


def check_upconv(seed: int = 0) -> float:
  """The weight mapping, checked alone on random weights: the max difference between
  flax ConvTranspose(4, 2, SAME), torch ConvTranspose2d(4, 2, 1) on the mapped weight
  and, where the plug-in package is installed, the CPU phase form of
  sils_jax/cpu_kernels/upconv.py on the same parameters."""
  import jax
  import flax.linen as fnn
  x = jax.random.uniform(jax.random.key(seed), (2, 5, 6, 7))
  ref = fnn.ConvTranspose(3, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
  params = ref.init(jax.random.key(seed + 1), x)
  want = np.asarray(ref.apply(params, x))
  conv = upsample_conv(7, 3)
  with torch.no_grad():
    conv.weight.copy_(conv_transpose_weight(params["params"]["kernel"]))
    got = conv(_t(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  diffs = [np.abs(got - want).max()]
  try:
    from sils_jax.cpu_kernels import ConvTranspose
  except ImportError:
    pass
  else:
    phases = ConvTranspose(3, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)
    diffs.append(np.abs(np.asarray(phases.apply(params, x)) - want).max())
  return float(max(diffs))


def check_against_jax(image_size: int = 32, batch: int = 4, num_layers: int = 2,
                      cpu_kernels: str = "off") -> dict:
  """Same weights, same batch: torch vs sils_jax losses and gradient norms, before and
  after one Adam step of G and D. Uses the synthetic 'quick' config at ``image_size``,
  with ``config.cpu_kernels=cpu_kernels`` ('off': flax's nn.Conv / nn.ConvTranspose;
  'auto': on the CPU the sils_jax/cpu_kernels forms, same parameters)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import jax
  import jax.numpy as jnp
  from configs.synthetic import get_config
  from sils_jax.training import state as jstate
  from sils_jax.training import step as jstep

  config = get_config("three_layers_quick" if num_layers == 3 else "quick")
  config.image_size = image_size
  config.cpu_kernels = cpu_kernels
  hp = HParams.from_jax_config(config)
  cfg = jstep.LossConfig.from_config(config)
  g_state, d_state = jstate.create_states(config, jstate.init_key(0))
  # create_states' apply_fn normalises over the pmap axis 'batch': outside pmap use a
  # model without a BatchNorm axis name (same parameters, same maths on one device).
  g_state = g_state.replace(apply_fn=jstate.make_generator(config, axis_name=None).apply)

  data = random_batch(hp, batch, seed=1)
  jbatch = {"x": jnp.asarray(data["x"].permute(0, 2, 3, 1).numpy()),
            "layers": jnp.asarray(data["layers"].permute(0, 1, 3, 4, 2).numpy())}

  @jax.jit
  def jax_step(g_state, d_state, batch):
    """step.py train_step without pmap: the losses, grad norms and the updated states."""
    (_, (g_metrics, stats, preds)), g_grads = jax.value_and_grad(jstep.generator_loss, has_aux=True)(
        g_state.params, g_state, d_state.params, d_state.apply_fn, batch, cfg)
    (_, d_metrics), d_grads = jax.value_and_grad(jstep.discriminator_loss, has_aux=True)(
        d_state.params, d_state.apply_fn, batch["layers"], jax.lax.stop_gradient(preds), cfg)
    metrics = {**g_metrics, **d_metrics, "g_grad_norm": jstep._global_norm(g_grads),
               "d_grad_norm": jstep._global_norm(d_grads)}
    new_g = g_state.apply_gradients(grads=g_grads, batch_stats=stats)
    return new_g, d_state.apply_gradients(grads=d_grads), metrics, preds

  trainer = Trainer(hp, torch.device("cpu"))
  load_jax_params(trainer, g_state.params, d_state.params)

  # the first generator pass alone: the predicted layers
  with torch.no_grad():
    _, torch_preds = trainer.gen.separate(data["x"])
  report = {"check": "torch_vs_jax", "image_size": image_size, "batch": batch, "num_layers": num_layers,
            "jax_cpu_kernels": config.cpu_kernels, "jax_backend": jax.default_backend(),
            "upconv_max_abs_diff": check_upconv()}
  for step in (1, 2):  # step 2 runs after one Adam update of both
    g_state, d_state, jm, jpreds = jax_step(g_state, d_state, jbatch)
    tm = trainer.train_step(data, with_grad_norms=True)
    if step == 1:
      tp = torch.stack(torch_preds, 1).permute(0, 1, 3, 4, 2).numpy()
      report["preds_max_abs_diff"] = float(np.abs(tp - np.asarray(jpreds)).max())
    losses = {k: (tm[k], float(jm[k])) for k in sorted(jm) if k in tm}
    missing = sorted(set(jm) ^ set(tm))
    abs_d = {k: abs(t - j) for k, (t, j) in losses.items()}
    rel_d = {k: abs(t - j) / max(abs(j), 1e-12) for k, (t, j) in losses.items()}
    worst = max(rel_d, key=rel_d.get)
    report[f"step{step}"] = {
        "max_abs_diff": max(abs_d.values()), "max_rel_diff": rel_d[worst], "worst": worst,
        "values_torch_jax": losses, "unmatched_keys": missing}
  report["ok"] = all(report[f"step{s}"]["max_rel_diff"] < 1e-4 for s in (1, 2))
  return report


# ------------------------------------------------------------------------ CLI


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--image_size", type=int, default=None, help="S (default 128; --check: 32)")
  p.add_argument("--batch", type=int, default=None, help="images per step (default 8; --check: 4)")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--layers", type=int, default=2, help="number of layers N")
  p.add_argument("--compile", action="store_true", help="torch.compile the generator loss")
  p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:I")
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
  p.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                 help="memory format of activations and weights (auto: the faster one measured)")
  p.add_argument("--autocast", choices=("off", "bf16"), default="off",
                 help="bf16: the forward passes under torch.autocast(bfloat16) (mixed precision)")
  p.add_argument("--check", action="store_true", help="compare losses with sils_jax on the same weights")
  p.add_argument("--cpu_kernels", choices=("off", "auto"), default="off",
                 help="--check: the JAX model's config.cpu_kernels (off: flax's conv layers; auto: on a CPU, "
                      "the sils_jax/cpu_kernels forms training runs)")
  args = p.parse_args(argv)
  if args.threads > 0:
    torch.set_num_threads(args.threads)

  if args.check:
    out = check_against_jax(args.image_size or 32, args.batch or 4, args.layers, args.cpu_kernels)
    print(json.dumps(out))
    return

  args.image_size = args.image_size or 128
  args.batch = args.batch or 8
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
  if args.image_size % 32:
    raise SystemExit(f"--image_size must be a multiple of 32 (five stride-2 levels), got {args.image_size}")
  if args.device.startswith("cuda"):
    # cuDNN autotuning for the fixed shapes; TF32 matmuls like XLA's default on GPU
    # (torch already allows TF32 in cuDNN convolutions by default).
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
  try:
    out = benchmark(args)
  except Exception as e:  # noqa: BLE001 -- report a failed compile as a JSON line
    if not args.compile:
      raise
    out = {"framework": "torch", "torch_version": torch.__version__, "mode": "compile",
           "device": args.device, "config": "synthetic", "batch": args.batch,
           "image_size": args.image_size, "num_layers": args.layers,
           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
