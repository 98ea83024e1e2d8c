"""The paper's synthetic experiment (Sec. 5.2): squares vs circles, 128x128, unpaired.

Every field and its default (the paper's settings): sils_jax/default_config.py.

Variants (``--config=configs/synthetic.py:VARIANT``):
  (none)        the paper's settings, two layers (square, circle).
  quick         a few-minute CPU run at 64x64.
  three_layers  Sec. 5.4: square, circle, triangle, 5000 images.
  three_layers_quick  the quick run with three layers.
"""

import ml_collections

from sils_jax.default_config import get_config as default_config

VARIANTS = ("", "quick", "three_layers", "three_layers_quick")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = default_config()
  variant = variant or ""
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}: expected one of {VARIANTS}")
  if variant.startswith("three_layers"):
    c.layer_names = ("square", "circle", "triangle")
    c.shapes = ("square", "circle", "triangle")
    c.num_train = 5000  # Sec. 5.4: 5000 images
    c.lambda_intra = (0.5, 0.5, 0.5)
    c.lambda_cycle_layers = (10.0, 10.0, 10.0)
  if variant.endswith("quick"):
    c.image_size = 64
    c.num_train_steps = 1000
    c.log_every_steps = 100
    c.eval_every_steps = 250
    c.num_eval_images = 200
    c.checkpoint_every_steps = 250
  return c
