"""Multi-branch discriminator D (paper Sec. 4, after UNIT).

"For the i-th branch, the input image is down-sampled by i-1 times via average
pooling and then fed to the network. Each branch has four convolution layers with
{32, 64, 128, 32} filters of size 4x4 and a stride of 2. In the end, the output
features from different branches are fused together followed by a sigmoid."

Downsampling between branches follows UNIT: AvgPool(3, stride 2, pad 1,
count_include_pad=False). Each branch ends with a 1x1 conv to one channel of
patch logits; the sigmoid lives in the loss (computed from logits), and the
"fusion" is the sum of the per-branch losses (as UNIT does), so the module returns
the list of per-branch logit maps.

Mixed precision: convolutions run in ``dtype`` (bfloat16 on GPU/TPU) with float32
parameters; the logits are returned float32 so the GAN losses run in float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any  # a conv layer class: nn.Conv, or sils_jax/cpu_kernels' form of it


def downsample(x: jax.Array) -> jax.Array:
  """UNIT's AvgPool2d(3, stride=2, padding=1, count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)


class Discriminator(nn.Module):
  """One layer's D: ``num_branches`` branches; returns a list of [B, h, w, 1] logits."""

  num_branches: int = 1
  features: Sequence[int] = (32, 64, 128, 32)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    init = nn.initializers.normal(0.02)
    h_in = (x * 2.0 - 1.0).astype(self.dtype)
    outs = []
    for b in range(self.num_branches):
      if b > 0:
        h_in = downsample(h_in)
      h = h_in
      for i, f in enumerate(self.features):
        h = self.conv(f, (4, 4), strides=(2, 2), padding="SAME", kernel_init=init, dtype=self.dtype,
                      name=f"branch{b}_conv{i}")(h)
        h = nn.leaky_relu(h, 0.2)
      h = self.conv(1, (1, 1), kernel_init=init, dtype=self.dtype, name=f"branch{b}_logits")(h)
      outs.append(h.astype(jnp.float32))
    return outs


class LayerDiscriminators(nn.Module):
  """D_1..D_N: one discriminator per layer, same structure, unshared parameters."""

  num_layers: int = 2
  num_branches: int = 1
  features: Sequence[int] = (32, 64, 128, 32)
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, layers: jax.Array) -> list[list[jax.Array]]:
    """layers: [B, N, H, W, C] -> for each layer k, D_k's list of branch logits."""
    if layers.ndim != 5 or layers.shape[1] != self.num_layers:
      raise ValueError(f"expected layers of shape [B, {self.num_layers}, H, W, C], got {layers.shape}")
    return [Discriminator(self.num_branches, tuple(self.features), self.dtype, self.conv,
                          name=f"d{k}")(layers[:, k])
            for k in range(self.num_layers)]
