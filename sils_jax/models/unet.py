"""The synthetic-data generator stream E∘G of paper Sec. 4.

"Each of the encoders E_Y and E_Z has five convolutional layers, which have
{16, 32, 64, 128, 256} filters of the size 4x4 and a stride of 2. Batch
normalization and leaky ReLU activation are applied after every convolutional
layer. Each of the decoders G_Y and G_Z has the same layers as the encoder but in a
reverse order plus a final layer with 3 channels. The corresponding layers of the
encoder and decoder have mirror-link connections (U-Net)."

Encoder and decoder are separate modules because the SS loss needs E's codes. The
conv layers are module arguments (``conv``, ``conv_transpose``; flax's by default):
``sils_jax/cpu_kernels`` passes faster CPU forms of the same maths and parameters.

Mixed precision: ``dtype`` is the dtype of activations and convolutions (bfloat16 on
GPU/TPU); parameters are ``param_dtype`` float32 (flax's default). Flax's BatchNorm
and GroupNorm compute their statistics in float32 whatever ``dtype`` is
(``force_float32_reductions``) and keep ``batch_stats`` float32; only their output
is cast to ``dtype``. The encoder's features (and so the latent codes) come out in
``dtype``; the decoder's image comes out float32, so the losses run in float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

NORMS = ("batch", "instance", "none")


def make_norm(kind: str, *, train: bool, axis_name: str | None, dtype: Any, name: str) -> Any:
  """Normalisation after a conv: 'batch' (paper), 'instance' or 'none'.

  Statistics are float32 and parameters ``param_dtype`` float32; ``dtype`` is only
  the dtype of the normalised output.
  """
  if kind == "batch":
    # Under pmap the statistics are averaged over the 'batch' axis, so N devices
    # x b images normalise exactly like one device with N*b images.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if train else None, dtype=dtype, name=name)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=dtype, name=name)
  if kind == "none":
    return lambda h: h
  raise ValueError(f"config.norm must be one of {NORMS}, got {kind!r}")


def output_activation(h: jax.Array, kind: str) -> jax.Array:
  """The decoder's output in float32: 'none' (the authors' code) or 'sigmoid'."""
  h = h.astype(jnp.float32)
  if kind == "sigmoid":
    return nn.sigmoid(h)
  if kind == "none":
    return h
  raise ValueError(f"config.output_activation must be 'none' or 'sigmoid', got {kind!r}")


class Encoder(nn.Module):
  """E: five 4x4 stride-2 convs, each conv -> norm -> leaky ReLU.

  Returns the feature map of every level; the last one is the latent code f.
  Input images are in [0, 1] and are mapped to [-1, 1] first.
  """

  features: Sequence[int] = (16, 32, 64, 128, 256)
  norm: str = "batch"
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    h = (x * 2.0 - 1.0).astype(self.dtype)
    feats = []
    for i, f in enumerate(self.features):
      # a bias before a normalisation layer is removed by it: drop it
      h = self.conv(f, (4, 4), strides=(2, 2), padding="SAME", use_bias=self.norm == "none",
                    dtype=self.dtype, name=f"conv{i}")(h)
      h = make_norm(self.norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype,
                    name=f"norm{i}")(h)
      h = nn.leaky_relu(h, 0.2)
      feats.append(h)
    return feats


class Decoder(nn.Module):
  """G: the encoder's layers in reverse order (4x4 stride-2 up-convs), U-Net
  mirror links from every encoder level, and a final 3-channel conv."""

  features: Sequence[int] = (128, 64, 32, 16, 16)
  out_channels: int = 3
  norm: str = "batch"
  bn_axis_name: str | None = None
  output_activation: str = "none"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  conv_transpose: ModuleDef = nn.ConvTranspose

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(feats) != len(self.features):
      raise ValueError(f"Decoder has {len(self.features)} levels but got {len(feats)} encoder features")
    h = feats[-1]
    for i, f in enumerate(self.features):
      if i > 0:  # mirror link: concatenate the encoder feature of the same resolution
        h = jnp.concatenate([h, feats[-1 - i]], axis=-1)
      h = self.conv_transpose(f, (4, 4), strides=(2, 2), padding="SAME", use_bias=self.norm == "none",
                              dtype=self.dtype, name=f"up{i}")(h)
      h = make_norm(self.norm, train=train, axis_name=self.bn_axis_name, dtype=self.dtype,
                    name=f"norm{i}")(h)
      h = nn.leaky_relu(h, 0.2)
    h = self.conv(self.out_channels, (3, 3), padding="SAME", dtype=self.dtype, name="out")(h)
    return output_activation(h, self.output_activation)
