"""The N-stream generator: for every layer k an encoder E_k and a decoder G_k with
the same structure and unshared parameters (paper Sec. 4; N = 2 in the paper's
main experiments, 3 in Sec. 5.4).

``dtype`` is the compute dtype of every stream (see ``unet.py``): parameters and
BatchNorm statistics stay float32, the layer images come out float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sils_jax.models.unet import Decoder, Encoder, ModuleDef
from sils_jax.models.vgg import ContextDecoder, VGGEncoder

GENERATORS = ("unet", "vgg")


class LayerSeparator(nn.Module):
  num_layers: int = 2
  encoder_features: Sequence[int] = (16, 32, 64, 128, 256)
  decoder_features: Sequence[int] = (128, 64, 32, 16, 16)
  norm: str = "batch"
  bn_axis_name: str | None = None
  output_activation: str = "none"
  dtype: Any = jnp.float32
  # the conv layer classes (same maths and parameters as flax's; sils_jax/cpu_kernels
  # passes its CPU forms)
  conv: ModuleDef = nn.Conv
  conv_transpose: ModuleDef = nn.ConvTranspose
  # 'unet': the synthetic-data stream (unet.py); 'vgg': VGG-19 encoder and dilated
  # context decoder for real images (vgg.py; encoder_features and norm do not apply,
  # decoder_features are the four decoder blocks' filters)
  generator: str = "unet"
  vgg_preprocess: str = "torch"  # vgg.py: 'caffe' (Keras weights) or 'torch' (torchvision)
  vgg_channel_divisor: int = 1  # VGG-19's widths divided by this (tests; 1 = VGG-19)

  def setup(self):
    if self.generator == "vgg":
      self.encoders = [VGGEncoder(self.vgg_preprocess, self.dtype, self.conv, self.vgg_channel_divisor,
                                  name=f"E{k}")
                       for k in range(self.num_layers)]
      self.decoders = [ContextDecoder(tuple(self.decoder_features), output_activation=self.output_activation,
                                      dtype=self.dtype, conv=self.conv, name=f"G{k}")
                       for k in range(self.num_layers)]
      return
    if self.generator != "unet":
      raise ValueError(f"config.generator must be one of {GENERATORS}, got {self.generator!r}")
    kw = dict(norm=self.norm, bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv=self.conv)
    self.encoders = [Encoder(tuple(self.encoder_features), name=f"E{k}", **kw)
                     for k in range(self.num_layers)]
    self.decoders = [Decoder(tuple(self.decoder_features), output_activation=self.output_activation,
                             conv_transpose=self.conv_transpose, name=f"G{k}", **kw)
                     for k in range(self.num_layers)]

  def encode(self, x: jax.Array, *, train: bool) -> list[list[jax.Array]]:
    """E_k(x) for every stream k: a list (streams) of lists (levels) of features."""
    return [e(x, train=train) for e in self.encoders]

  def encode_layers(self, layers: jax.Array, *, train: bool) -> list[list[jax.Array]]:
    """E_k(y_k): stream k encodes layer image k. layers: [B, N, H, W, C]."""
    return [e(layers[:, k], train=train) for k, e in enumerate(self.encoders)]

  def decode(self, codes: Sequence[Sequence[jax.Array]], *, train: bool) -> jax.Array:
    """G_k(f_k) for every stream, stacked to [B, N, H, W, C]."""
    return jnp.stack([g(c, train=train) for g, c in zip(self.decoders, codes)], axis=1)

  def separate(self, x: jax.Array, *, train: bool) -> tuple[list[list[jax.Array]], jax.Array]:
    """Returns (codes E_k(x), layers G_k(E_k(x)) [B, N, H, W, C])."""
    codes = self.encode(x, train=train)
    return codes, self.decode(codes, train=train)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.separate(x, train=train)[1]
