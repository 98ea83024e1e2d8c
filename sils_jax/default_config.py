"""Every config field, with its default: the paper's synthetic experiment (Sec. 5.2).

The one source of defaults. ``configs/*.py`` start from ``get_config()`` and change a
few fields; code reads fields directly (``config.lambda0``), never with a fallback.
A checkpoint's saved config from an older version is filled in once, at restore
(``complete``). Fields are flat (``--config.lambda0=5``), grouped below: the paper's
hyper-parameters with their symbols first, then data, loop and runtime fields.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
from absl import logging


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # === The paper's method (Sec. 4, eqs. 5-9) =================================
  # --- generator E_k, G_k and discriminators D_k (Sec. 4) ---
  # 'unet' (synthetic data) or 'vgg' (real images: VGG-19 encoder, dilated context
  # decoder; sils_jax/models/vgg.py)
  c.generator = "unet"
  c.encoder_features = (16, 32, 64, 128, 256)  # E: five 4x4 stride-2 convs
  c.decoder_features = (128, 64, 32, 16, 16)  # G: the encoder's layers reversed, then a 3-channel conv
  c.norm = "batch"  # batch normalisation after every conv ('batch', 'instance', 'none')
  c.output_activation = "none"  # 'none' (authors' code) or 'sigmoid'
  c.disc_branches = 1  # 1 branch for synthetic data, 3 for real images
  c.disc_features = (32, 64, 128, 32)  # each branch: 4 convs, 4x4, stride 2
  c.vgg_weights = ""  # 'vgg': pretrained VGG-19 file (.h5 Keras, .pth torchvision, .npz converted); '': random init
  c.vgg_preprocess = "auto"  # 'caffe' (Keras weights), 'torch' (torchvision), 'auto': from the weights file
  # Train the VGG encoders (default) or keep them at the pretrained weights (with frozen,
  # identical encoders the SS inter-domain term cannot change).
  c.freeze_encoder = False
  c.vgg_channel_divisor = 1  # divide VGG-19's widths (tests only; 1 for pretrained weights)

  # --- losses, eqs. (5)-(9) ---
  # 'unsupervised' (the method) or 'supervised': the same generator trained with an L1
  # loss on paired training triplets, the upper bound every table reports.
  c.objective = "unsupervised"
  c.gan_loss = "nsgan"  # eq. (7) log form ('nsgan'), or UNIT's least squares ('lsgan')
  c.lambda0 = 5.0  # λ0: weight of the GAN terms, eq. (7)
  c.lambda_intra = (0.5, 0.5)  # λ1, λ2: intra-domain L1 terms of eq. (5), one per layer
  c.lambda_inter = 1.0  # λ3: inter-domain term 1 - d_psi of eq. (5)
  # λ4, λ5, λ6 of eq. (8). Sec. 4 lists 1.0, but Sec. 5.2 finds w2 = 10 best in eq. (9)
  # and concludes "this suggests λ4 = λ5 = λ6 = 10.0 in the experiment".
  c.lambda_cycle_x = 10.0  # λ4
  c.lambda_cycle_layers = (10.0, 10.0)  # λ5, λ6: one per layer
  c.alpha = 1.4  # α of the modified sigmoid, eq. (6)
  c.w1 = 1.0  # w1 of eq. (9), multiplies L_SS
  c.w2 = 1.0  # w2 of eq. (9), multiplies L_CC (already folded into λ4..λ6 = 10)
  # Where the SS distance is measured. Paper: on the latent code (the last encoder
  # level, index 4), elementwise. The authors' earlier code: 'mean' mode (d_psi of
  # ss_scale x mean L1 per level) over levels (1, 2, 3, 4).
  c.ss_mode = "elementwise"
  c.ss_levels = (4,)
  c.ss_scale = 10.0
  # Gradient penalty (Sec. 4 "with gradient penalization"; weight not given): R1 on
  # real layer samples with weight gamma = gp_weight; 0 disables it.
  c.gp_weight = 1.0
  # What R1 differentiates per image: the 'sum' of D's patch logits, or their 'mean'
  # (the sum form is (h*w)^2 times stronger per branch).
  c.gp_logits = "sum"
  # Beside the paper (0 in its method): the remix term (Neural Egg Separation): the
  # blend of the batch's unpaired layer samples is separated with an L1 loss to them
  # (sils_jax/losses.py remix_loss).
  c.remix_weight = 0.0

  # --- optimisation (Sec. 4) ---
  c.learning_rate = 1e-4  # Adam, lr 0.0001
  c.b1 = 0.0  # Adam momentums 0.0 and 0.9
  c.b2 = 0.9
  c.lr_schedule = "constant"  # 'constant' or 'linear_decay' (to 0 over the second half)
  c.per_device_batch_size = 1  # one x, one y, one z per mini-batch
  c.num_train_steps = 100_000  # not stated in the paper

  # === Data ==================================================================
  c.dataset = "synthetic"  # 'synthetic' (rendered on the fly), or a prepared dataset below
  c.image_size = 128  # Sec. 5.1: 128x128
  c.layer_names = ("square", "circle")  # one name per layer; outputs and metrics use them
  c.shapes = ("square", "circle")  # synthetic shape kind of each layer (square/circle/triangle)
  # synthetic: coloured layers (True), or gray ones as the authors' toy generator's
  # use_color off path makes them (False)
  c.synthetic_color = True
  c.num_train = 4000  # Sec. 5.2: 4000 training images (unpaired: x, y, z drawn independently)
  c.num_test = 1000  # 1000 test images (ground-truth triplets)
  c.blend_mode = "additive"  # x = y ⊕ z of eq. (1): 'additive' (reflection, toy) or 'multiplicative' (intrinsic)
  # Prepared datasets (sils_jax/data/builders.py; dataset 'mit_intrinsic', 'sir2',
  # 'image_folders', or 'synthetic_shapes' = these shapes stored as a TFDS dataset).
  c.manual_dir = ""  # the user's downloaded data (real datasets); nothing is downloaded
  c.data_dir = ""  # where prepared datasets are written ('': ~/tensorflow_datasets)
  c.subset1 = ()  # mit_intrinsic / sir2: objects (keys) of subset 1, the inputs x ((): documented default split)
  c.subset2 = ()  # ... of subset 2: the layer images and the test triplets
  c.folders = ()  # image_folders: the mixtures' directory, then one per layer (relative to manual_dir)
  c.test_folder = ""  # image_folders: optional directory of test triplets (subfolders named as `folders`)
  c.augment = False  # Sec. 4 (real data): random scale in scale_range, random crop to image_size, random flip
  c.scale_range = (0.8, 1.2)  # Sec. 4: "random scalings by factors within 0.8 ~ 1.2"
  c.base_size = 0  # resize the shorter side to this before augmenting (0: keep the file's size)
  c.eval_image_size = 0  # test triplets: shorter side resized to this, centre crop (0: image_size)

  # === Training loop =========================================================
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.num_eval_images = 1000  # test triplets used by the periodic evaluation
  c.eval_batch_size = 50
  # How to normalise at evaluation: 'per_image' uses each image's own statistics,
  # exactly as training does with one image per batch (paper), 'running' the
  # BatchNorm running averages (better when training with large batches).
  c.eval_norm_stats = "per_image"
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  c.num_sample_images = 6  # columns of the PNG sample grid
  c.tensorboard = "auto"  # TensorBoard event files in WORKDIR/tensorboard ('auto', 'on', 'off')

  # === Runtime: how the same maths runs ======================================
  # 'auto': convolutions in the faster forms of sils_jax/cpu_kernels (same maths and
  # parameters): on the CPU backend matrix / Winograd forms and direct C++ kernels
  # where a compiler builds them; on GPU/TPU the sub-pixel up-conv. 'off': flax's layers.
  c.cpu_kernels = "auto"
  c.compute_dtype = "float32"  # activations/convs: 'float32' or 'bfloat16' (params, optimizer state, losses float32)
  # Input batches made ahead in worker threads (sils_jax/data/prefetch.py); 0: in the
  # loop; -1: 2 on GPU/TPU, 0 on CPU (where the workers take cores from the step)
  c.prefetch_batches = -1
  c.input_workers = 0  # 0: min(8, CPU count)
  c.profile_steps = 0  # trace this many steps with jax.profiler into WORKDIR/profile (0: off)
  c.profile_start_step = 10  # first traced step (after compilation)

  # --- multi-host (jax.distributed) ---
  c.distributed = False  # join a multi-process job (auto on SLURM with several tasks and TPU pods)
  c.coordinator_address = ""  # host:port of process 0; empty: from the environment
  c.num_processes = 0  # 0: from the environment
  c.process_id = -1  # -1: from the environment
  return c


# Fields of older versions that no longer exist; a saved config holding them restores
# without them (they chose forms of the same maths).
RETIRED_FIELDS = ("conv_impl", "upsample")


def complete(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A checkpoint's saved config, with the fields added since it was written set to
  their defaults (the values older versions used) and retired fields dropped."""
  config = get_config()
  missing = sorted(set(config) - set(saved))
  unknown = sorted(set(saved) - set(config) - set(RETIRED_FIELDS))
  if unknown:
    raise ValueError(f"the saved config has fields this version does not know: {unknown}")
  for key, value in saved.items():
    if key in config:
      config[key] = tuple(value) if isinstance(value, list) else value
  if missing:
    logging.info("restored config: fields %s were not saved (an older version) and take their defaults",
                 missing)
  return config
