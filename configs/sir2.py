"""Reflection removal on SIR² (paper Sec. 5.3, Table 2).

  python -m sils_jax.main --config=configs/sir2.py --workdir=runs/sir2 \
      --config.manual_dir=/data/SIR2 --config.vgg_weights=/data/vgg19.npz

manual_dir holds {SolidObjectDataset, PostcardDataset, WildSceneDataset}/{blended,
transmission_layer, reflection_layer}, files matched by stem (454 triplets). The
triplets are split into two disjoint subsets (Sec. 5.1): inputs x from subset 1,
background and reflection images and the test triplets from subset 2. Default split:
keys ('SubDataset/stem') sorted, alternating; set config.subset1 / subset2 to choose.

Variants: (none) the paper's settings; tiny: a seconds-long CPU run (tests).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_images import real_image_config  # noqa: E402


def get_config(variant=None):
  c = real_image_config(variant)
  c.dataset = "sir2"
  c.layer_names = ("background", "reflection")
  c.blend_mode = "additive"  # x = background + reflection
  return c
