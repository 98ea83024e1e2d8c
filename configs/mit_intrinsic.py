"""Intrinsic image decomposition on MIT Intrinsic Images (paper Sec. 5.3, Table 1).

  python -m sils_jax.main --config=configs/mit_intrinsic.py --workdir=runs/mit \
      --config.manual_dir=/data/MIT-intrinsic --config.vgg_weights=/data/vgg19.npz

manual_dir holds one folder per object (original.png, reflectance.png, shading.png,
mask.png, light01..10.png). Objects are split into two disjoint subsets (Sec. 5.1):
inputs x (original and light images) from subset 1, albedo and shading images and
the test triplets from subset 2. Default split: object folders sorted by name,
alternating (sils_jax/data/layouts.py); set config.subset1 / subset2 to choose.

Variants: (none) the paper's settings; tiny: a seconds-long CPU run (tests).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_images import real_image_config  # noqa: E402


def get_config(variant=None):
  c = real_image_config(variant)
  c.dataset = "mit_intrinsic"
  c.layer_names = ("albedo", "shading")
  c.blend_mode = "multiplicative"  # x = albedo x shading
  return c
