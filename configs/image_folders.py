"""Your own separation task from unpaired image folders.

  python -m sils_jax.main --config=configs/image_folders.py --workdir=runs/mine \
      --config.manual_dir=/data/mine \
      --config.folders="('mixtures','background','reflection')" \
      --config.layer_names="('background','reflection')" --config.blend_mode=additive \
      [--config.test_folder=test] [--config.vgg_weights=/data/vgg19.npz]

Training reads N + 1 directories of unpaired images (any sizes, any counts): the
mixtures, then one per layer, in the order of layer_names. The optional test folder
holds subfolders named like `folders`, whose files are matched by stem into
ground-truth triplets for evaluation. blend_mode is 'additive' (x = sum of layers)
or 'multiplicative' (x = product).

Variants: (none) the paper's real-image settings; tiny: a seconds-long CPU run (tests).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_images import real_image_config  # noqa: E402


def get_config(variant=None):
  c = real_image_config(variant)
  c.dataset = "image_folders"
  c.layer_names = ("background", "reflection")
  c.folders = ("mixtures", "background", "reflection")
  c.test_folder = ""
  c.blend_mode = "additive"
  return c
