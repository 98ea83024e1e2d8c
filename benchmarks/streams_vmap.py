"""The N layer streams as one batched computation (stacked parameters + ``jax.vmap``)
against N separate networks (the model as it is), timed in one process.

  python benchmarks/streams_vmap.py --batch=8 --image_size=128 --rounds=4 --steps=3

Two pieces of the synthetic model, each jitted as value and gradient:
  'd'  the N discriminators on real and fake layers: a GAN term on each and the R1
       penalty (the squared input gradient of D on the real layers), differentiated
       with respect to the parameters: the discriminator update's shape.
  'g'  the N generator streams (U-Net encoder + decoder, BatchNorm in training mode)
       on one input, a loss on their layer images, differentiated with respect to the
       parameters.
The batched form stacks the per-stream parameter trees (the checkpoint layout stays the
same) and vmaps one stream's ``apply`` over them. Before timing, both forms run on the
same parameters and inputs, and the summary reports the largest relative difference of
their outputs (loss, gradients, BatchNorm statistics) as ``max_rel_diff``: float
rounding (~1e-6) for the same maths. Prints one JSON line per round and a summary line.
Nothing here needs TensorFlow.
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_integer("batch", 1, "Images per step.")
  flags.DEFINE_integer("image_size", 128, "Image size (a multiple of 32).")
  flags.DEFINE_integer("layers", 2, "Number of layer streams N.")
  flags.DEFINE_integer("rounds", 4, "Rounds; each times every form of every piece once.")
  flags.DEFINE_integer("steps", 3, "Timed calls per form per round (median recorded).")
  flags.DEFINE_string("conv_impl", "auto", "config.conv_impl for both forms.")


def _stack(trees):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def d_piece(batch: int, size: int, n: int, conv_impl: str):
  """(separate, batched) functions of (params, real, fake) and their arguments."""
  import jax
  import jax.numpy as jnp
  from sils_jax.models.discriminator import Discriminator, LayerDiscriminators
  real = jax.random.uniform(jax.random.key(0), (batch, n, size, size, 3))
  fake = jax.random.uniform(jax.random.key(1), (batch, n, size, size, 3))
  model = LayerDiscriminators(num_layers=n, conv_impl=conv_impl)
  one = Discriminator(conv_impl=conv_impl)
  params = model.init(jax.random.key(2), real)["params"]

  def separate(p, y):
    return model.apply({"params": p}, y)

  def batched(p, y):
    outs = jax.vmap(lambda q, x: one.apply({"params": q}, x), in_axes=(0, 1))(
        _stack([p[f"d{k}"] for k in range(n)]), y)
    return [[o[k] for o in outs] for k in range(n)]

  def make(d):
    def loss(p, real, fake):
      def d_real(r):
        return sum(jnp.sum(-jax.nn.softplus(-l)) for ls in d(p, r) for l in ls)
      value_real, grad_real = jax.value_and_grad(d_real)(real)
      value_fake = sum(jnp.sum(jax.nn.softplus(l)) for ls in d(p, fake) for l in ls)
      return value_fake - value_real + 0.5 * jnp.sum(grad_real ** 2)
    return jax.jit(jax.value_and_grad(loss))

  return make(separate), make(batched), (params, real, fake)


def g_piece(batch: int, size: int, n: int, conv_impl: str):
  import jax
  import jax.numpy as jnp
  from sils_jax.models.separator import LayerSeparator
  from sils_jax.models.unet import Decoder, Encoder
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3))
  model = LayerSeparator(num_layers=n, upsample="auto", conv_impl=conv_impl)
  variables = model.init(jax.random.key(2), x, train=True)
  enc = Encoder(model.encoder_features, norm="batch", conv_impl=conv_impl)
  dec = Decoder(model.decoder_features, upsample="auto", norm="batch", conv_impl=conv_impl)

  def separate(p, s, x):
    y, new = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
    return y, new["batch_stats"]

  def batched(p, s, x):
    def stream(pe, se, pg, sg):
      codes, ne = enc.apply({"params": pe, "batch_stats": se}, x, train=True, mutable=["batch_stats"])
      y, ng = dec.apply({"params": pg, "batch_stats": sg}, codes, train=True, mutable=["batch_stats"])
      return y, ne["batch_stats"], ng["batch_stats"]
    per = lambda prefix, tree: _stack([tree[f"{prefix}{k}"] for k in range(n)])
    y, ne, ng = jax.vmap(stream)(per("E", p), per("E", s), per("G", p), per("G", s))
    new = {**{f"E{k}": jax.tree.map(lambda a: a[k], ne) for k in range(n)},
           **{f"G{k}": jax.tree.map(lambda a: a[k], ng) for k in range(n)}}
    return jnp.moveaxis(y, 0, 1), new

  def make(g):
    def loss(p, s, x):
      y, new = g(p, s, x)
      return jnp.mean(jnp.abs(y - 0.3)) + jnp.mean(y ** 2), new
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  return make(separate), make(batched), (variables["params"], variables["batch_stats"], x)


def max_rel_diff(a, b) -> float:
  """The largest |a - b| of a leaf over the largest |b| of that leaf, over the leaves;
  inf where a leaf holds a NaN on either side (as in ab_step.max_rel_diff: `max` would
  otherwise skip it and report 0)."""
  import jax
  import numpy as np
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    diff = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-12))
    worst = max(worst, np.inf if np.isnan(diff) else diff)
  return worst


def main(argv):
  del argv
  import jax
  import numpy as np
  if FLAGS.image_size % 32 or FLAGS.image_size <= 0:
    raise app.UsageError(f"--image_size must be a positive multiple of 32 (five stride-2 convs), "
                         f"got {FLAGS.image_size}")
  if FLAGS.batch < 1 or FLAGS.layers < 1 or FLAGS.rounds < 1 or FLAGS.steps < 1:
    raise app.UsageError("--batch, --layers, --rounds and --steps must be >= 1")
  runs = {}
  for piece, build in (("d", d_piece), ("g", g_piece)):
    sep, bat, args = build(FLAGS.batch, FLAGS.image_size, FLAGS.layers, FLAGS.conv_impl)
    compiled = {}
    for form, fn in (("separate", sep), ("batched", bat)):
      t = time.perf_counter()
      compiled[form] = fn.lower(*args).compile()
      compiled[form + "_compile_s"] = round(time.perf_counter() - t, 1)
    a, b = compiled["separate"](*args), compiled["batched"](*args)
    runs[piece] = {"compiled": compiled, "args": args, "max_rel_diff": max_rel_diff(b, a)}
  ms = {(p, f): [] for p in runs for f in ("separate", "batched")}
  for r in range(FLAGS.rounds):
    for (piece, form), times in ms.items():
      fn, args = runs[piece]["compiled"][form], runs[piece]["args"]
      t_round = []
      for _ in range(FLAGS.steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        t_round.append((time.perf_counter() - t) * 1e3)
      times.append(float(np.median(t_round)))
    print(json.dumps({"round": r, **{f"{p}_{f}": round(t[-1], 1) for (p, f), t in ms.items()}}), flush=True)
  dev = jax.local_devices()[0]
  summary = {"summary": "streams_vmap", "device": f"{dev.platform}:{dev.device_kind}",
             "batch": FLAGS.batch, "image_size": FLAGS.image_size, "layers": FLAGS.layers,
             "conv_impl": FLAGS.conv_impl, "rounds": FLAGS.rounds, "steps": FLAGS.steps}
  for piece, run in runs.items():
    sep, bat = (float(np.median(ms[(piece, f)])) for f in ("separate", "batched"))
    summary[piece] = {"separate_ms": round(sep, 1), "batched_ms": round(bat, 1),
                      "batched_over_separate": round(bat / sep, 3),
                      "compile_s": [run["compiled"]["separate_compile_s"], run["compiled"]["batched_compile_s"]],
                      "max_rel_diff": run["max_rel_diff"]}
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
