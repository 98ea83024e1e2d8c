"""Models, optimisers and TrainStates for the generators and discriminators."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sils_jax.models.discriminator import LayerDiscriminators
from sils_jax.models.separator import LayerSeparator

AXIS = "batch"  # the pmap axis name


class GenState(train_state.TrainState):
  """Generator (all E_k, G_k) state, with BatchNorm statistics."""
  batch_stats: Any = None


def make_generator(config, *, axis_name: str | None = AXIS) -> LayerSeparator:
  """G (all streams). Activations and convs run in ``config.compute_dtype``; parameters,
  BatchNorm statistics and outputs are float32. Configs saved before the field existed
  (restored checkpoints) read as float32."""
  return LayerSeparator(
      num_layers=len(config.layer_names),
      encoder_features=tuple(config.encoder_features),
      decoder_features=tuple(config.decoder_features),
      norm=config.norm,
      bn_axis_name=axis_name,
      upsample=config.upsample,
      output_activation=config.output_activation,
      dtype=jnp.dtype(config.get("compute_dtype", "float32")),
      conv_impl=config.get("conv_impl", "auto"))


def make_discriminator(config) -> LayerDiscriminators:
  """D (all layers), in ``config.compute_dtype`` like the generator; logits are float32."""
  return LayerDiscriminators(
      num_layers=len(config.layer_names),
      num_branches=config.disc_branches,
      features=tuple(config.disc_features),
      dtype=jnp.dtype(config.get("compute_dtype", "float32")),
      conv_impl=config.get("conv_impl", "auto"))


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


def create_states(config, rng: jax.Array) -> tuple[GenState, train_state.TrainState]:
  """Initialises G (all streams) and D (all layers) from ``rng``; step is an array."""
  n, s = len(config.layer_names), config.image_size
  g_rng, d_rng = jax.random.split(rng)
  gen, disc = make_generator(config, axis_name=None), make_discriminator(config)
  g_vars = jax.jit(lambda r: gen.init(r, jnp.zeros((1, s, s, 3)), train=False))(g_rng)
  d_vars = jax.jit(lambda r: disc.init(r, jnp.zeros((1, n, s, s, 3))))(d_rng)
  g_state = GenState.create(apply_fn=make_generator(config).apply, params=g_vars["params"],
                            batch_stats=g_vars["batch_stats"] if "batch_stats" in g_vars else {},
                            tx=make_optimizer(config))
  d_state = train_state.TrainState.create(apply_fn=disc.apply, params=d_vars["params"],
                                          tx=make_optimizer(config))
  step0 = jnp.zeros((), jnp.int32)
  return g_state.replace(step=step0), d_state.replace(step=step0)
