"""Where the step's gap to PyTorch is: each network module's forward + backward in JAX
and in the PyTorch peer, alternated in one process.

  python benchmarks/module_gap.py --batch=8 --image_size=128 --rounds=8

Modules (synthetic config, BatchNorm in training mode, channels-last torch):
  enc   one encoder E_k: gradients of a loss on every level's features, to the
        parameters and the image (the step runs 6 of these: E_k(x), E_k(y_k), E_k(x'))
  dec   one decoder G_k: gradients to the parameters and the features (4 per step)
  d_r1  one discriminator with the R1 penalty's second-order gradient (2 per step,
        plus first-order passes on the fakes)
One JSON line per module: median ms of each framework over ``--rounds`` rounds (each
round times ``--steps`` calls of each, in alternating order) and torch / JAX (> 1: JAX
faster). The JAX side uses the defaults of the step (``conv_impl``, ``upsample`` auto;
glibc keeping freed memory and huge pages as ``train_step.py``), or ``--conv_impl``.
Needs torch (a benchmark extra); nothing here needs TensorFlow.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sils_jax import cpu_memory  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--conv_impl", default="auto")
  args = p.parse_args()
  cpu_memory.keep_freed_memory()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import torch_reference as tr
  from sils_jax.models.discriminator import Discriminator
  from sils_jax.models.unet import Decoder, Encoder

  rng = np.random.default_rng(0)
  x_np = rng.random((args.batch, args.image_size, args.image_size, 3), np.float32)
  x = jnp.asarray(x_np)
  enc, dec, disc = Encoder(conv_impl=args.conv_impl), Decoder(upsample="auto", conv_impl=args.conv_impl), \
      Discriminator(conv_impl=args.conv_impl)
  ev = enc.init(jax.random.key(0), x, train=True)
  feats = enc.apply(ev, x, train=True, mutable=["batch_stats"])[0]
  dv = dec.init(jax.random.key(1), feats, train=True)
  dparams = disc.init(jax.random.key(2), x)["params"]

  def enc_loss(p, x):
    f, _ = enc.apply({"params": p, "batch_stats": ev["batch_stats"]}, x, train=True, mutable=["batch_stats"])
    return sum(jnp.mean(t * t) for t in f)

  def dec_loss(p, feats):
    y, _ = dec.apply({"params": p, "batch_stats": dv["batch_stats"]}, feats, train=True, mutable=["batch_stats"])
    return jnp.mean(y * y)

  def d_loss(p, x):
    logits = lambda x: sum(jnp.mean(t) for t in disc.apply({"params": p}, x))
    v, g = jax.value_and_grad(logits)(x)
    return v + jnp.sum(g * g)

  jax_fns = {"enc": (jax.jit(jax.grad(enc_loss, (0, 1))), (ev["params"], x)),
             "dec": (jax.jit(jax.grad(dec_loss, (0, 1))), (dv["params"], feats)),
             "d_r1": (jax.jit(jax.grad(d_loss)), (dparams, x))}

  torch.manual_seed(0)
  cl = torch.channels_last
  te = tr.Encoder((16, 32, 64, 128, 256)).to(memory_format=cl)
  td = tr.Decoder((16, 32, 64, 128, 256), (128, 64, 32, 16, 16), "transpose").to(memory_format=cl)
  tD = tr.Discriminator(1, (32, 64, 128, 32)).to(memory_format=cl)
  tx = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=cl)
  with torch.no_grad():
    tfeats = [f.detach().contiguous(memory_format=cl) for f in te(tx)]

  def t_enc():
    xx = tx.clone().requires_grad_(True)
    te.zero_grad(set_to_none=True)
    sum((t * t).mean() for t in te(xx)).backward()

  def t_dec():
    fs = [f.clone().requires_grad_(True) for f in tfeats]
    td.zero_grad(set_to_none=True)
    y = td(fs)
    (y * y).mean().backward()

  def t_d():
    xx = tx.clone().requires_grad_(True)
    tD.zero_grad(set_to_none=True)
    o = sum(t.mean() for t in tD(xx))
    g, = torch.autograd.grad(o, xx, create_graph=True)
    (o + (g * g).sum()).backward()

  runners = {k: {"jax": (lambda f=f, a=a: jax.block_until_ready(f(*a))), "torch": t}
             for (k, (f, a)), t in zip(jax_fns.items(), (t_enc, t_dec, t_d))}
  for r in runners.values():  # compile and warm up
    for fn in r.values():
      fn()
      fn()
  huge = cpu_memory.use_huge_pages()

  ms = {k: {"jax": [], "torch": []} for k in runners}
  for rnd in range(args.rounds):
    for k, r in runners.items():
      for who in (("jax", "torch") if rnd % 2 == 0 else ("torch", "jax")):
        times = []
        for _ in range(args.steps):
          t0 = time.perf_counter()
          r[who]()
          times.append(time.perf_counter() - t0)
        ms[k][who].append(float(np.median(times)) * 1e3)
  for k in runners:
    j, t = float(np.median(ms[k]["jax"])), float(np.median(ms[k]["torch"]))
    print(json.dumps({"module": k, "batch": args.batch, "image_size": args.image_size, "conv_impl": args.conv_impl,
                      "jax_ms": round(j, 2), "torch_ms": round(t, 2), "torch_over_jax": round(t / j, 3),
                      "jax_rounds": [round(v, 2) for v in ms[k]["jax"]],
                      "torch_rounds": [round(v, 2) for v in ms[k]["torch"]], "huge_pages": huge}), flush=True)


if __name__ == "__main__":
  main()
