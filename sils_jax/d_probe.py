"""Can the discriminators tell real layers from the trivial split x/N? A diagnostic.

  python -m sils_jax.d_probe --config=configs/synthetic.py:quick --steps=3000
  python -m sils_jax.d_probe --config=configs/synthetic.py:quick --config.gp_weight=0

Trains only D (the config's discriminators, optimiser, loss and R1 penalty: exactly
`sils_jax.training.step.discriminator_loss`) on unpaired real layer images against a
fixed fake, each layer = x/N of an independent mixture, and prints every `--every` steps
the mean D loss of eq. (7) per layer (ln 4 = 1.386 at chance) and the share of patch
logits on the right side of 0. In the full method the generator's first outputs are
close to such blends; a D that cannot separate them from real layers gives the
generator no shape signal. Prints one JSON line per report (RESULTS.md, "The
discriminators learn slowly even against a fixed fake").
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/synthetic.py:quick", "Training config.")
flags.DEFINE_integer("steps", 3000, "D updates.")
flags.DEFINE_integer("every", 300, "Report every this many steps (means over the window).")


def main(argv):
  del argv
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from sils_jax.training import loop
  from sils_jax.training.state import create_states, init_key
  from sils_jax.training.step import LossConfig, discriminator_loss

  config = FLAGS.config
  cfg = LossConfig.from_config(config)
  _, d = create_states(config, init_key(config.seed))
  data = loop.make_dataset(config)
  n = len(config.layer_names)
  b = config.per_device_batch_size

  @functools.partial(jax.jit, donate_argnums=0)
  def step(d, real, fake):
    (_, m), grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
        d.params, d.apply_fn, real, fake, cfg)
    logits_r = d.apply_fn({"params": d.params}, real)
    logits_f = d.apply_fn({"params": d.params}, fake)
    acc = [0.5 * (jnp.mean(r[0] > 0) + jnp.mean(f[0] < 0)) for r, f in zip(logits_r, logits_f)]
    return d.apply_gradients(grads=grads), m, jnp.stack(acc)

  window, t0 = [], time.perf_counter()
  for i in range(FLAGS.steps):
    batch = data.train_batch(i, b)  # x and the layers are unpaired draws
    fake = np.repeat(batch["x"][:, None] / n, n, axis=1)
    d, m, acc = step(d, jnp.asarray(batch["layers"]), jnp.asarray(fake))
    window.append([float(m[f"gan_d_{k}"]) for k in range(n)] + [float(a) for a in acc] + [float(m["r1"])])
    if (i + 1) % FLAGS.every == 0 or i + 1 == FLAGS.steps:
      w = np.mean(window, axis=0)
      print(json.dumps({"step": i + 1, "d_loss": [round(v, 4) for v in w[:n]], "chance": round(float(np.log(4)), 4),
                        "patch_accuracy": [round(v, 3) for v in w[n:2 * n]], "r1": round(float(w[-1]), 5),
                        "gp_weight": cfg.gp_weight, "gp_logits": cfg.gp_logits,
                        "elapsed_s": round(time.perf_counter() - t0, 1)}), flush=True)
      window = []


if __name__ == "__main__":
  app.run(main)
