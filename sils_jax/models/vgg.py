"""The generator stream for real images (paper Sec. 4, "Generator for real image
separation tasks").

"The encoders E_Y and E_Z are implemented by using VGG-19. The decoders G_Y and
G_Z have 4 convolution blocks in each, and each block comprises a convolution
layer, a leaky ReLU activation layer and an up-sample layer. The last block is
followed by a fully convolutional network with 64 filters of size 3x3, a stride of
1 and dilation ratios of {2, 4, 8, 16, 32, 1}. Instance normalization and leaky
ReLU activation are applied after each convolution layer. The output layer is a
convolution layer with three 1x1 filters."

Readings of what the paper leaves open (each stated here and in the README):

* Encoder: VGG-19's sixteen 3x3 convolutions with ReLU and its 2x2 max pools
  between blocks, named as in the original (``conv1_1`` ... ``conv5_4``); the
  fifth pool and the classifier are not used, so the latent code ``conv5_4`` is at
  1/16 of the input size. Parameters are ``{conv_name: {kernel HWIO, bias}}``, the
  layout the converters in ``vgg_weights.py`` produce.
* Preprocessing: images enter in [0, 1] RGB and are mapped the way the pretrained
  weights expect: ``'caffe'`` (Keras: 0-255, RGB -> BGR, minus the ImageNet mean
  [103.939, 116.779, 123.68]) or ``'torch'`` (torchvision: (x - mean) / std with mean
  [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]).
* The features the rest of the method sees (``LEVELS``): ``conv1_2``, ``conv2_2``,
  ``conv3_2`` (linked into the decoder), ``conv4_4`` and the latent code ``conv5_4``
  (index 4, the level the SS loss uses by default, as for the synthetic encoder).
* Decoder links: ``conv1_2``, ``conv2_2`` and ``conv3_2`` are average-pooled to the
  latent code's resolution (by 16, 8 and 4: exact area resizing) and concatenated
  with it as the first block's input, as a hypercolumn.
* Decoder blocks: 3x3 convolutions with ``decoder_features`` filters (not given in
  the paper; default 256, 128, 64, 64), leaky ReLU 0.2, then a x2 bilinear
  up-sampling, so the four blocks return to the input size. Instance normalisation
  is applied in the context network, where the paper lists it with the dilations;
  the decoder blocks follow the paper's list "conv, leaky ReLU, up-sample".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sils_jax.models.unet import ModuleDef, output_activation

# (block, convolutions per block) of VGG-19; pools after blocks 1-4.
BLOCKS = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))
CONV_NAMES = tuple(f"conv{b}_{i}" for b, n in BLOCKS for i in range(1, n + 1))
CONV_FEATURES = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}
LEVELS = ("conv1_2", "conv2_2", "conv3_2", "conv4_4", "conv5_4")
LINKED = ("conv1_2", "conv2_2", "conv3_2")
STRIDE = 16  # the latent code's down-sampling factor: input sizes must be multiples of it
CONTEXT_DILATIONS = (2, 4, 8, 16, 32, 1)
PREPROCESS = ("caffe", "torch")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def preprocess(x: jax.Array, mode: str) -> jax.Array:
  """[0, 1] RGB images -> the input the pretrained VGG-19 of ``mode`` expects."""
  if mode == "caffe":
    bgr = x[..., ::-1] * 255.0
    return bgr - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)
  if mode == "torch":
    return (x - jnp.asarray(TORCH_MEAN, x.dtype)) / jnp.asarray(TORCH_STD, x.dtype)
  raise ValueError(f"config.vgg_preprocess must be one of {PREPROCESS}, got {mode!r}")


class VGG19(nn.Module):
  """VGG-19's convolutions; returns ``{name: activation}`` of every conv (after ReLU)."""

  preprocess: str = "torch"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  stop_after: str = "conv5_4"
  width_divisor: int = 1  # VGG-19's widths divided by this (small test models; 1 = VGG-19)

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    h = preprocess(x.astype(jnp.float32), self.preprocess).astype(self.dtype)
    out = {}
    for b, n in BLOCKS:
      if b > 1:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for i in range(1, n + 1):
        name = f"conv{b}_{i}"
        h = nn.relu(self.conv(CONV_FEATURES[b] // self.width_divisor, (3, 3), dtype=self.dtype, name=name)(h))
        out[name] = h
        if name == self.stop_after:
          return out
    return out


class VGGEncoder(nn.Module):
  """E for real images: VGG-19 (parameters under ``vgg``); returns the ``LEVELS`` features."""

  preprocess: str = "torch"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  width_divisor: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    del train  # no normalisation layers
    if x.shape[1] % STRIDE or x.shape[2] % STRIDE:
      raise ValueError(f"VGG encoder: image height and width must be multiples of {STRIDE}, "
                       f"got {x.shape[1]}x{x.shape[2]}")
    acts = VGG19(self.preprocess, self.dtype, self.conv, width_divisor=self.width_divisor, name="vgg")(x)
    return [acts[name] for name in LEVELS]


def _area_down(h: jax.Array, factor: int) -> jax.Array:
  return h if factor == 1 else nn.avg_pool(h, (factor, factor), strides=(factor, factor))


def _upsample2(h: jax.Array) -> jax.Array:
  b, hh, ww, c = h.shape
  return jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="bilinear")


class ContextDecoder(nn.Module):
  """G for real images: 4 x (3x3 conv, leaky ReLU, x2 up-sample), the dilated context
  network (3x3, 64 filters, dilations 2, 4, 8, 16, 32, 1, each with instance norm and
  leaky ReLU) and a 1x1 convolution to 3 channels."""

  features: Sequence[int] = (256, 128, 64, 64)
  context_features: int = 64
  dilations: Sequence[int] = CONTEXT_DILATIONS
  out_channels: int = 3
  output_activation: str = "none"
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
    del train  # instance norm has no running statistics
    if len(feats) != len(LEVELS):
      raise ValueError(f"ContextDecoder expects the {len(LEVELS)} features {LEVELS}, got {len(feats)}")
    code = feats[-1]
    size = code.shape[1]
    links = [_area_down(feats[LEVELS.index(n)], feats[LEVELS.index(n)].shape[1] // size) for n in LINKED]
    h = jnp.concatenate([code] + [l.astype(code.dtype) for l in links], axis=-1)
    for i, f in enumerate(self.features):
      h = self.conv(f, (3, 3), dtype=self.dtype, name=f"block{i}")(h)
      h = _upsample2(nn.leaky_relu(h, 0.2))
    for i, d in enumerate(self.dilations):
      h = nn.Conv(self.context_features, (3, 3), kernel_dilation=(d, d), padding="SAME",
                  use_bias=False, dtype=self.dtype, name=f"context{i}")(h)
      h = nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=self.dtype,
                       name=f"context{i}_norm")(h)
      h = nn.leaky_relu(h, 0.2)
    h = self.conv(self.out_channels, (1, 1), dtype=self.dtype, name="out")(h)
    return output_activation(h, self.output_activation)
