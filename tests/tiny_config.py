"""A tiny synthetic config that compiles and runs fast on a 2-core CPU.

Usable as a config file too: --config=tests/tiny_config.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs.synthetic import get_config as _synthetic  # noqa: E402


def tiny_config(num_layers: int = 2):
  c = _synthetic("three_layers_quick" if num_layers == 3 else "quick")
  c.image_size = 32
  c.encoder_features = (4, 8, 8, 8, 8)
  c.decoder_features = (8, 8, 8, 4, 4)
  c.num_train = 16
  c.num_test = 8
  c.num_eval_images = 4
  c.eval_batch_size = 4
  c.num_sample_images = 2
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  # flax's own layers compile in about half the time of the CPU forms ('auto'),
  # and the tests are compile-bound; both are checked equal in test_cpu_kernels.py,
  # and test_main_end_to_end_then_resume trains with 'auto'.
  c.cpu_kernels = "off"
  return c


def get_config(arg=None):
  return tiny_config(3 if arg == "three_layers" else 2)
