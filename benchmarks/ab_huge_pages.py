"""The training step with the heap in 4 KB pages against huge pages, A/B in one process.

  python benchmarks/ab_huge_pages.py --batch=8 --image_size=128 --rounds=10 --steps=5

``sils_jax.cpu_memory.use_huge_pages`` backs the heap, where the step's memory is kept
(``keep_freed_memory``), with transparent huge pages. Separate processes drift by 10-25%
on the 2-core CPU, so this script compiles the step once and switches the same heap
between the two states every round, in alternating order (plain, huge; huge, plain;
...): 'huge' is ``use_huge_pages()`` (``MADV_COLLAPSE``); 'plain' marks the heap
``MADV_NOHUGEPAGE`` and splits every huge page's mapping back into 4 KB entries, by
giving one 4 KB piece of each 2 MB range other access rights for a moment (``mprotect``
to read-write-execute and back: the kernel must then map the range page by page). The
memory stays where it was, so only the page size differs between the states. The first
round's 'plain' is the heap as malloc left it. One JSON line per round (with the MB in
huge pages), then a summary: medians of the round medians, their ratio (< 1: huge pages
faster) and in how many rounds 'huge' was faster. Linux with glibc only; needs
transparent huge pages set to 'madvise' or 'always'.
"""

import ctypes
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import ab_step  # noqa: E402

FLAGS = flags.FLAGS
_MADV_NOHUGEPAGE = 15
_PROT_RW, _PROT_RWX = 3, 7


def _split_huge_pages() -> None:
  from sils_jax import cpu_memory
  start, length = cpu_memory._heap_range()
  libc = cpu_memory.libc()
  if libc.madvise(start, length, _MADV_NOHUGEPAGE) != 0:
    raise OSError(ctypes.get_errno(), "madvise(MADV_NOHUGEPAGE)")
  huge = cpu_memory._huge_page_bytes()
  for off in range(0, length, huge):
    for prot in (_PROT_RWX, _PROT_RW):
      if libc.mprotect(start + off, 4096, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def main(argv):
  del argv
  memory = ab_step.train_step.apply_memory_flag()  # before jax touches a device
  import numpy as np
  from sils_jax import cpu_memory
  if memory != "set":
    raise app.UsageError(f"needs the kept heap (keep_freed_memory: {memory})")
  config = FLAGS.config
  if FLAGS.image_size:
    config.image_size = FLAGS.image_size
  s = ab_step.build(config, FLAGS.batch, {})
  ab_step.run_steps(s, FLAGS.warmup, timed=False)
  round_ms = {"plain": [], "huge": []}
  for r in range(FLAGS.rounds):
    for mode in ("plain", "huge") if r % 2 == 0 else ("huge", "plain"):
      if mode == "huge":
        done = cpu_memory.use_huge_pages()
        if not done.startswith("set"):
          raise app.UsageError(f"use_huge_pages: {done}")
      elif r:
        _split_huge_pages()
      ab_step.run_steps(s, 1, timed=False)
      round_ms[mode].append(float(np.median(ab_step.run_steps(s, FLAGS.steps, timed=True))))
      print(json.dumps({"round": r, "mode": mode, "anon_huge_mb": (cpu_memory._anon_huge_kb() or 0) >> 10,
                        "ms": round(round_ms[mode][-1], 1)}), flush=True)
  plain, huge = np.asarray(round_ms["plain"]), np.asarray(round_ms["huge"])
  print(json.dumps({"summary": "ab_huge_pages", "batch": FLAGS.batch, "image_size": config.image_size,
                    "rounds": FLAGS.rounds, "steps": FLAGS.steps, "keep_freed_memory": memory,
                    "plain_ms": round(float(np.median(plain)), 1), "huge_ms": round(float(np.median(huge)), 1),
                    "ratio_of_medians": round(float(np.median(huge) / np.median(plain)), 4),
                    "ratio_per_round_median": round(float(np.median(huge / plain)), 4),
                    "huge_faster_rounds": int((huge < plain).sum())}), flush=True)


if __name__ == "__main__":
  ab_step.define_timing_flags(batch=8, rounds=10, steps=5)
  app.run(main)
