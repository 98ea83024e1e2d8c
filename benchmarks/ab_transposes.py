"""The training step with the conv forms' hand-written transposes against autodiff's, A/B
in one process (``ab_step.py``'s round-robin timing).

  python benchmarks/ab_transposes.py --batch=8 --image_size=128 --rounds=20 --steps=2

``sils_jax.models.conv`` and ``upsample`` write the transposes of their linear
rearrangements (patches and their adding-back, the shift form's shifted sum,
Winograd's output transform, the up-convs' phase interleave) as pairs of custom VJPs.
The 'autodiff' variant traces the step with the plain functions instead (each
``custom_vjp``'s ``.fun``), so that JAX transposes their slices itself. Same values:
``max_rel_metric_diff`` is 0 when only the gradients' form differs. One JSON line per
round, then a summary line like ``ab_step.py``'s.
"""

import contextlib
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import ab_step  # noqa: E402

FLAGS = flags.FLAGS

# (module name, attribute): the custom-VJP functions swapped for their plain forms
SWAPPED = [("conv", "_patches"), ("conv", "_col2im"), ("conv", "_shifted_sum"), ("conv", "_shifted_stack"),
           ("conv", "_untile2"), ("conv", "_tile2"), ("upsample", "interleave_phases"),
           ("upsample", "scatter_phases")]


@contextlib.contextmanager
def autodiff_transposes():
  """Within the block, the functions in SWAPPED are their plain (autodiff) forms."""
  from sils_jax.models import conv, upsample
  modules = {"conv": conv, "upsample": upsample}
  saved = [(modules[m], name, getattr(modules[m], name)) for m, name in SWAPPED]
  try:
    for module, name, fn in saved:
      setattr(module, name, fn.fun)
    yield
  finally:
    for module, name, fn in saved:
      setattr(module, name, fn)


def main(argv):
  del argv
  memory = ab_step.train_step.apply_memory_flag()  # before jax touches a device
  import numpy as np
  config = FLAGS.config
  if FLAGS.image_size:
    config.image_size = FLAGS.image_size
  states = {}
  for name, ctx in (("autodiff", autodiff_transposes), ("hand_written", contextlib.nullcontext)):
    with ctx():  # the functions are looked up while the step is traced, in build
      states[name] = ab_step.build(config.copy_and_resolve_references(), FLAGS.batch, {})
    ab_step.run_steps(states[name], FLAGS.warmup, timed=False)
  huge_pages = ab_step.train_step.apply_huge_pages_flag()
  round_ms = ab_step.time_rounds(states, FLAGS.rounds, FLAGS.steps)
  ref = {k: np.asarray(v) for k, v in states["autodiff"]["metrics"].items()}
  rows = ab_step.summarise(round_ms)
  for name, row in rows.items():
    diff, key = ab_step.max_rel_diff({k: np.asarray(v) for k, v in states[name]["metrics"].items()}, ref)
    row.update(compile_s=states[name]["compile_s"], max_rel_metric_diff=diff, max_rel_metric_diff_key=key)
  faster = sum(b < a for a, b in zip(round_ms["autodiff"], round_ms["hand_written"]))
  print(json.dumps({"summary": "ab_transposes", "batch": FLAGS.batch, "image_size": config.image_size,
                    "rounds": FLAGS.rounds, "steps": FLAGS.steps, "keep_freed_memory": memory,
                    "huge_pages": huge_pages, "variants": rows,
                    "hand_written_faster_rounds": faster}), flush=True)


if __name__ == "__main__":
  ab_step.define_timing_flags(batch=8, rounds=20, steps=2)
  app.run(main)
