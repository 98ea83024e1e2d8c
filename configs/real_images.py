"""Settings shared by the real-image configs (paper Sec. 4 and 5.3), on top of the
synthetic config's losses and optimiser. Not a config file itself: mit_intrinsic.py,
sir2.py and image_folders.py import it."""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic import get_config as _synthetic  # noqa: E402


def real_image_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The shared settings; variant 'tiny' applies ``make_tiny`` ('' or None: the paper's)."""
  c = _synthetic()
  c.generator = "vgg"  # Sec. 4: VGG-19 encoders, dilated context decoders
  c.decoder_features = (256, 128, 64, 64)  # the 4 decoder blocks' filters (not stated in the paper)
  c.disc_branches = 3  # Sec. 4: "for the real image separation tasks, the number of branches is set to 3"
  c.augment = True  # Sec. 4: random scale 0.8-1.2, random crop, random horizontal flip
  c.image_size = 224  # training crops (not stated in the paper; VGG-19's native size)
  c.base_size = 256  # shorter side before the random scale (so 0.8-1.2 means 205-307 px, >= the crop)
  c.eval_image_size = 256  # test triplets: shorter side 256, centre crop
  c.vgg_weights = ""  # path to vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5, vgg19-*.pth or a converted .npz
  c.num_train = 0  # unused: the dataset's own counts
  c.num_test = 0
  c.num_eval_images = 1000  # all test triplets (MIT: 10 objects; SIR2: about 227)
  c.eval_batch_size = 4
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  if variant == "tiny":
    make_tiny(c)
  elif variant not in (None, ""):
    raise ValueError(f"unknown config variant {variant!r}: expected '' or 'tiny'")
  return c


def make_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few-second CPU variant on tiny fake trees (tests): 32x32 crops, VGG at 1/16 width."""
  c.image_size = 32
  c.base_size = 0
  c.eval_image_size = 32
  c.vgg_channel_divisor = 16
  c.cpu_kernels = "off"  # flax's layers compile in about half the time of the CPU forms
  c.decoder_features = (8, 8, 8, 8)
  c.disc_features = (8, 8, 8, 8)
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.num_eval_images = 2
  c.eval_batch_size = 2
  c.num_sample_images = 2
  return c
