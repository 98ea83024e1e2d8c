"""Models, optimisers and TrainStates for the generators and discriminators."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from sils_jax.models.discriminator import LayerDiscriminators
from sils_jax.models.separator import LayerSeparator

AXIS = "batch"  # the pmap axis name


def conv_layers(config) -> dict[str, Any]:
  """The conv layer classes the models are built with: with ``config.cpu_kernels='auto'``
  the faster forms of ``sils_jax/cpu_kernels`` (same maths and parameters; on the CPU
  its kernels are built here, before any trace), with 'off' flax's own (``{}``: the
  models' defaults). Without the wing installed, flax's layers."""
  if config.cpu_kernels == "off":
    return {}
  try:
    from sils_jax import cpu_kernels
  except ImportError as e:
    logging.warning("sils_jax.cpu_kernels cannot be imported (%s): flax's conv layers", e)
    return {}
  return cpu_kernels.layers(config.cpu_kernels, jax.default_backend())


class GenState(train_state.TrainState):
  """Generator (all E_k, G_k) state, with BatchNorm statistics."""
  batch_stats: Any = None


def make_generator(config, *, axis_name: str | None = AXIS, layers: dict | None = None) -> LayerSeparator:
  """G (all streams). Activations and convs run in ``config.compute_dtype``; parameters,
  BatchNorm statistics and outputs are float32. ``layers``: the conv layer classes
  (default ``conv_layers(config)``)."""
  return LayerSeparator(
      num_layers=len(config.layer_names),
      encoder_features=tuple(config.encoder_features),
      decoder_features=tuple(config.decoder_features),
      norm=config.norm,
      bn_axis_name=axis_name,
      output_activation=config.output_activation,
      dtype=jnp.dtype(config.compute_dtype),
      generator=config.generator,
      vgg_preprocess=resolve_vgg_preprocess(config),
      vgg_channel_divisor=config.vgg_channel_divisor,
      **(conv_layers(config) if layers is None else layers))


def resolve_vgg_preprocess(config) -> str:
  """config.vgg_preprocess, with 'auto' read from the weights file ('torch' without one).

  The training loop writes the resolved value into the config it saves, so a restored
  run never needs the weights file again."""
  mode = config.vgg_preprocess
  if mode != "auto":
    return mode
  path = config.vgg_weights
  if not path:
    return "torch"
  ext = os.path.splitext(path)[1].lower()
  if ext in (".h5", ".hdf5"):
    return "caffe"  # the Keras release
  if ext in (".pth", ".pt"):
    return "torch"  # torchvision's
  if ext == ".npz" and os.path.isfile(path):
    with np.load(path, allow_pickle=False) as f:
      if "preprocess" in f:
        return str(f["preprocess"])
  raise ValueError(f"config.vgg_weights={path!r}: cannot tell its preprocessing (expected an existing "
                   ".h5, .pth or converted .npz file); set config.vgg_preprocess to 'caffe' or 'torch'")


def load_pretrained_encoders(g_state: GenState, config) -> GenState:
  """Every stream's VGG-19 encoder E_k starts from the weights in config.vgg_weights."""
  from sils_jax.models import vgg_weights
  path = config.vgg_weights
  pretrained, _ = vgg_weights.load(path)
  params = dict(g_state.params)
  for k in range(len(config.layer_names)):
    current = params[f"E{k}"]["vgg"]
    for name, leaves in current.items():
      for leaf, value in leaves.items():
        want = value.shape
        got = pretrained[name][leaf].shape if name in pretrained and leaf in pretrained[name] else None
        if got != want:
          raise ValueError(f"{path}: {name}/{leaf} has shape {got}, the model expects {want} "
                           "(config.vgg_channel_divisor must be 1 for pretrained VGG-19 weights)")
    params[f"E{k}"] = {**params[f"E{k}"], "vgg": jax.tree.map(jnp.asarray, {n: dict(pretrained[n]) for n in current})}
  return g_state.replace(params=params)


def _frozen_labels(params) -> Any:
  """'frozen' for the encoders' parameters (E0, E1, ...), 'train' for the rest."""
  return {top: jax.tree.map(lambda _: "frozen" if top.startswith("E") else "train", sub)
          for top, sub in params.items()}


def make_generator_optimizer(config) -> optax.GradientTransformation:
  """Adam for G; with config.freeze_encoder the encoders' updates are zero (their
  gradients are still computed: the reported gradient norm includes them)."""
  adam = make_optimizer(config)
  if not config.freeze_encoder:
    return adam
  return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, _frozen_labels)


def make_discriminator(config, layers: dict | None = None) -> LayerDiscriminators:
  """D (all layers), in ``config.compute_dtype`` like the generator; logits are float32."""
  layers = conv_layers(config) if layers is None else layers
  return LayerDiscriminators(
      num_layers=len(config.layer_names),
      num_branches=config.disc_branches,
      features=tuple(config.disc_features),
      dtype=jnp.dtype(config.compute_dtype),
      **({"conv": layers["conv"]} if "conv" in layers else {}))


def learning_rate_fn(config) -> optax.Schedule:
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  half = config.num_train_steps // 2
  return optax.join_schedules(
      [optax.constant_schedule(config.learning_rate),
       optax.linear_schedule(config.learning_rate, 0.0, max(config.num_train_steps - half, 1))],
      [half])


def make_optimizer(config) -> optax.GradientTransformation:
  """Sec. 4: Adam, lr 1e-4, momentums (0.0, 0.9)."""
  return optax.adam(learning_rate_fn(config), b1=config.b1, b2=config.b2)


def init_key(seed: int) -> jax.Array:
  """The parameter-initialisation key.

  It uses the RBG generator: XLA:CPU compiles the threefry bit generator of a
  whole-network init 5x slower (33 s against 6 s for the generator at 64x64 on 2
  cores). Same seed and backend give the same parameters; nothing after the init
  draws random numbers (the data order is a pure function of seed and step).
  """
  return jax.random.key(seed, impl="rbg")


def create_states(config, rng: jax.Array, layers: dict | None = None) -> tuple[GenState, train_state.TrainState]:
  """Initialises G (all streams) and D (all layers) from ``rng``; step is an array.
  ``layers``: the conv layer classes (default ``conv_layers(config)``)."""
  n, s = len(config.layer_names), config.image_size
  g_rng, d_rng = jax.random.split(rng)
  layers = conv_layers(config) if layers is None else layers
  gen, disc = make_generator(config, axis_name=None, layers=layers), make_discriminator(config, layers)
  g_vars = jax.jit(lambda r: gen.init(r, jnp.zeros((1, s, s, 3)), train=False))(g_rng)
  d_vars = jax.jit(lambda r: disc.init(r, jnp.zeros((1, n, s, s, 3))))(d_rng)
  # BatchNorm syncs its batch statistics over the pmap axis; with one device in all
  # that sync is the identity, but XLA still runs each of its ~85 all-reduces per step
  # (8-10% of the CPU step at batch 1, benchmarks/README.md), so it is left out.
  # pmap can span several devices only when there are several, so this never drops a
  # sync that matters.
  bn_axis = AXIS if jax.device_count() > 1 else None
  g_state = GenState.create(apply_fn=make_generator(config, axis_name=bn_axis, layers=layers).apply,
                            params=g_vars["params"],
                            batch_stats=g_vars["batch_stats"] if "batch_stats" in g_vars else {},
                            tx=make_generator_optimizer(config))
  d_state = train_state.TrainState.create(apply_fn=disc.apply, params=d_vars["params"],
                                          tx=make_optimizer(config))
  step0 = jnp.zeros((), jnp.int32)
  return g_state.replace(step=step0), d_state.replace(step=step0)
