"""Where a traced step spends its time: the complete events of a jax.profiler perfetto
trace (``jax.profiler.trace(dir, create_perfetto_trace=True)``) summed by name.

Used by ``train_step.py --profile_steps=N``; no TensorFlow, no TensorBoard plugin.
"""

import collections
import glob
import gzip
import json
import os
import re


def top_ops(trace_dir: str, steps: int, top: int) -> dict:
  """Sums the durations of a perfetto trace's complete events by name, per traced
  process: on GPU the device's kernels (process '/device:GPU:0'), on CPU the host
  threads running XLA's thunks. Returns {process: {"total_ms": .., "ops": [[name,
  ms per step, count per step], ...]}} for processes whose events add up to at least
  1 ms per step. Nested events (a thunk executor around its thunks) are all counted:
  compare names, not the total, across processes. "kinds" sums the same by kind: the
  name without XLA's instance suffix ('concatenate.129' -> 'concatenate'), so that
  one step's hundreds of fusions read as a few categories."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    return {}
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", str(e["pid"])) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  dur = collections.defaultdict(lambda: collections.defaultdict(float))
  count = collections.defaultdict(lambda: collections.defaultdict(int))
  for e in events:
    # names starting with '$' are Python frames from the profiler's Python tracer
    if e.get("ph") == "X" and "dur" in e and not e.get("name", "").startswith("$"):
      proc = names.get(e.get("pid"), str(e.get("pid")))
      dur[proc][e.get("name", "?")] += float(e["dur"]) / 1e3 / steps
      count[proc][e.get("name", "?")] += 1
  out = {}
  for proc, ops in dur.items():
    total = sum(ops.values())
    if total < 1.0:
      continue
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    kind_ms, kind_n = collections.defaultdict(float), collections.defaultdict(int)
    for name, ms in ops.items():
      kind = re.sub(r"\.\d+$", "", name)
      kind_ms[kind] += ms
      kind_n[kind] += count[proc][name]
    kinds = sorted(kind_ms.items(), key=lambda kv: -kv[1])[:top]
    out[proc] = {"total_ms": round(total, 3),
                 "ops": [[name[:120], round(ms, 3), round(count[proc][name] / steps, 2)]
                         for name, ms in ranked],
                 "kinds": [[kind[:120], round(ms, 3), round(kind_n[kind] / steps, 2)]
                           for kind, ms in kinds]}
  return out
