"""Validation of user configs: one clear error per mistake, naming the field."""

from __future__ import annotations

from typing import Any

from sils_jax import blend, default_config
from sils_jax.training.step import GP_LOGITS

DATASETS = ("synthetic", "synthetic_shapes", "mit_intrinsic", "sir2", "image_folders")
GENERATORS = ("unet", "vgg")
VGG_PREPROCESS = ("auto", "caffe", "torch")
GAN_LOSSES = ("nsgan", "lsgan")
SS_MODES = ("elementwise", "mean")
LR_SCHEDULES = ("constant", "linear_decay")
EVAL_NORM_STATS = ("per_image", "running")
COMPUTE_DTYPES = ("float32", "bfloat16")
CPU_KERNELS = ("auto", "off")  # sils_jax/cpu_kernels (MODES; not imported: the wing is optional)
OBJECTIVES = ("unsupervised", "supervised")


class ConfigError(ValueError):
  """A config field has a value the program cannot use."""


def _need(cond: bool, field: str, expected: str, got: Any) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: expected {expected}, got {got!r}")


def validate(config) -> None:
  """Raises ConfigError naming the first bad field."""
  known = set(default_config.get_config())
  missing, unknown = sorted(known - set(config)), sorted(set(config) - known)
  if unknown:
    raise ConfigError(f"config: unknown fields {unknown} (every field and its meaning: "
                      "sils_jax/default_config.py)")
  if missing:
    raise ConfigError(f"config: fields {missing} are missing (start a config file from "
                      "sils_jax.default_config.get_config() and change what differs)")
  n = len(config.layer_names)
  _need(config.dataset in DATASETS, "dataset", f"one of {DATASETS}", config.dataset)
  _need(n >= 2, "layer_names", "at least two layer names", config.layer_names)
  _need(len(set(config.layer_names)) == n, "layer_names", "distinct names", config.layer_names)
  for name in config.layer_names:
    _need(isinstance(name, str) and name.isidentifier(), "layer_names",
          "names usable in file names (letters, digits, _)", name)
  if config.dataset in ("synthetic", "synthetic_shapes"):
    _need(len(config.shapes) == n, "shapes", f"{n} shape kinds (one per layer name)", config.shapes)
  else:
    _need(bool(config.manual_dir), "manual_dir",
          f"the directory holding the {config.dataset} data (nothing is downloaded)", config.manual_dir)
  if config.dataset == "image_folders":
    _need(len(config.folders) == n + 1, "folders",
          f"{n + 1} directories: the mixtures', then one per layer {tuple(config.layer_names)}", config.folders)
  if config.dataset in ("mit_intrinsic", "sir2"):
    _need(not set(config.subset1) & set(config.subset2), "subset2",
          "no entry also in subset1 (the split must be disjoint)", sorted(set(config.subset1) & set(config.subset2)))
  lo, hi = config.scale_range
  _need(0 < lo <= hi, "scale_range", "(low, high) with 0 < low <= high", config.scale_range)
  _need(config.base_size >= 0, "base_size", "an integer >= 0 (0: keep the file's size)",
        config.base_size)
  generator = config.generator
  _need(generator in GENERATORS, "generator", f"one of {GENERATORS}", generator)
  _need(config.vgg_preprocess in VGG_PREPROCESS, "vgg_preprocess", f"one of {VGG_PREPROCESS}",
        config.vgg_preprocess)
  divisor = config.vgg_channel_divisor
  _need(divisor in (1, 2, 4, 8, 16, 32, 64), "vgg_channel_divisor", "a power of two dividing 64", divisor)
  if config.vgg_weights:
    _need(generator == "vgg", "vgg_weights", "'' unless config.generator='vgg'", config.vgg_weights)
    _need(divisor == 1, "vgg_channel_divisor", "1 with pretrained weights (VGG-19's own widths)", divisor)
  _need(config.blend_mode in blend.MODES, "blend_mode", f"one of {blend.MODES}", config.blend_mode)
  depth = len(config.encoder_features) if generator == "unet" else 5  # vgg: vgg.LEVELS
  if generator == "unet":
    _need(len(config.decoder_features) == depth, "decoder_features",
          f"{depth} entries (one per encoder level)", config.decoder_features)
    _need(config.image_size % (2 ** depth) == 0, "image_size",
          f"a multiple of 2**{depth} = {2 ** depth} (the encoder halves it {depth} times)", config.image_size)
  else:
    _need(len(config.decoder_features) == 4, "decoder_features",
          "4 entries (the filters of the 4 decoder blocks of the VGG generator)", config.decoder_features)
    for field in ("image_size", "eval_image_size"):
      _need(config[field] % 16 == 0, field, "a multiple of 16 (VGG-19's latent code is at 1/16)",
            config[field])
  _need(config.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {COMPUTE_DTYPES}",
        config.compute_dtype)
  _need(config.cpu_kernels in CPU_KERNELS, "cpu_kernels", f"one of {CPU_KERNELS}", config.cpu_kernels)
  _need(config.disc_branches >= 1, "disc_branches", "an integer >= 1", config.disc_branches)
  _need(config.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}",
        config.objective)
  _need(config.gan_loss in GAN_LOSSES, "gan_loss", f"one of {GAN_LOSSES}", config.gan_loss)
  _need(len(config.lambda_intra) == n, "lambda_intra", f"{n} weights (λ1, λ2, ... one per layer)",
        config.lambda_intra)
  _need(len(config.lambda_cycle_layers) == n, "lambda_cycle_layers",
        f"{n} weights (λ5, λ6, ... one per layer)", config.lambda_cycle_layers)
  _need(config.alpha > 0, "alpha", "a positive number", config.alpha)
  _need(config.ss_mode in SS_MODES, "ss_mode", f"one of {SS_MODES}", config.ss_mode)
  _need(len(config.ss_levels) >= 1 and all(0 <= int(l) < depth for l in config.ss_levels),
        "ss_levels", f"encoder level indices in [0, {depth - 1}]", config.ss_levels)
  _need(config.gp_weight >= 0, "gp_weight", "a number >= 0", config.gp_weight)
  _need(config.remix_weight >= 0, "remix_weight", "a number >= 0 (0: no remix term, as in the paper)",
        config.remix_weight)
  _need(config.synthetic_color or config.dataset == "synthetic", "synthetic_color",
        "True unless config.dataset='synthetic' (only the on-the-fly renderer draws gray layers)",
        config.synthetic_color)
  _need(config.gp_logits in GP_LOGITS, "gp_logits", f"one of {GP_LOGITS}",
        config.gp_logits)
  _need(config.learning_rate > 0, "learning_rate", "a positive number", config.learning_rate)
  _need(config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}", config.lr_schedule)
  _need(config.per_device_batch_size >= 1, "per_device_batch_size", "an integer >= 1",
        config.per_device_batch_size)
  _need(config.num_train_steps >= 1, "num_train_steps", "an integer >= 1", config.num_train_steps)
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "eval_batch_size"):
    _need(config[field] >= 1, field, "an integer >= 1", config[field])
  _need(config.tensorboard in ("auto", "on", "off"), "tensorboard", "'auto', 'on' or 'off'",
        config.tensorboard)
  _need(config.prefetch_batches >= -1, "prefetch_batches",
        "an integer >= 0 (0: no prefetch) or -1 (auto)", config.prefetch_batches)
  _need(config.input_workers >= 0, "input_workers", "an integer >= 0 (0: automatic)",
        config.input_workers)
  _need(config.profile_steps >= 0, "profile_steps", "an integer >= 0 (0: off)", config.profile_steps)
  _need(config.eval_norm_stats in EVAL_NORM_STATS, "eval_norm_stats", f"one of {EVAL_NORM_STATS}",
        config.eval_norm_stats)
