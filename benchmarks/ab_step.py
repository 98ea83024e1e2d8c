"""Interleaved A/B timing of training-step variants in one process.

  python benchmarks/ab_step.py --batch=8 --image_size=128 --rounds=5 --steps=5 \\
      --variant=base: --variant=xla:conv_impl=xla \\
      --variant=sched:@xla_cpu_enable_concurrency_optimized_scheduler=true

On the 2-core CPU the step time drifts by 10-25% between processes, and within one
process over minutes, so two separate `train_step.py` runs cannot show a 5% change.
This script compiles every variant of the pmapped step first, then times them
round-robin: in each round every variant runs `--steps` synchronised steps, and its
round's median is recorded. It prints one JSON line per round and then a summary line:
for each variant the median of its round medians, the ratio to the first variant (< 1:
faster), the compile time, and `max_rel_metric_diff` (with its metric's name), the
largest relative difference of its step metrics (losses, gradient norms) from the
first variant's after the same steps from the same initial states and batch. It is 0
for the same computation and small for an equivalent form (conv_impl, upsample), whose
float rounding grows over the steps of GAN training; a large value means the variant
computes something else.

--variant=NAME:ITEM,ITEM,... ; each ITEM is one of
  key=value     a config override (dotted keys for nested fields);
  @option=value an XLA compiler option for this variant's compilation (the DebugOptions
                field names, e.g. @xla_cpu_enable_concurrency_optimized_scheduler=true);
  %module.attr=value  a module attribute set while this variant is traced and compiled,
                then restored (a rule read at trace time, e.g.
                %sils_jax.models.direct_conv.SMALL_IN_CHANNELS=() takes the first convs
                out of the direct kernels).
--kernels=TAG:PATH loads another build of the direct-conv CPU kernels (a shared library
compiled from some version of sils_jax/models/direct_conv.cc, as in ab_kernel_builds.py)
under the FFI names TAG_*; a variant with %sils_jax.models.direct_conv.TARGET_PREFIX=TAG
runs the step on it. So two kernel builds are timed in the whole step, in one process:

  python benchmarks/ab_step.py --batch=8 --image_size=128 --kernels=old:/tmp/old.so \
      --variant=old:%sils_jax.models.direct_conv.TARGET_PREFIX=old --variant=new:

Values are read as Python literals where they parse (1, 2.5, True, 'x'), true/false
as booleans, else as strings. The batch is --batch's for every variant (an override of
per_device_batch_size is replaced by it). Nothing here needs TensorFlow.
"""

import ast
import contextlib
import importlib
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import train_step  # noqa: E402

FLAGS = flags.FLAGS


def define_timing_flags(batch: int = 1, rounds: int = 5, steps: int = 5):
  """--config, --batch, --image_size, --rounds, --steps, --warmup (with these
  defaults) and train_step.py's --keep_freed_memory and --huge_pages; also used by
  ab_transposes.py."""
  config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Training config.")
  flags.DEFINE_integer("batch", batch, "Global batch size (must divide by the device count).")
  flags.DEFINE_integer("image_size", 0, "Image size (0: the config's).")
  flags.DEFINE_integer("rounds", rounds, "Rounds; each times every variant once.")
  flags.DEFINE_integer("steps", steps, "Synchronised steps per variant per round.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
  train_step.define_memory_flag()


def _define_flags():
  """Defined when run as a script, so that tests can import the helpers below."""
  define_timing_flags()
  flags.DEFINE_multi_string("variant", [], "NAME:ITEM,ITEM,... (see the module doc); at least two.")
  flags.DEFINE_multi_string("kernels", [], "TAG:PATH: a direct-conv kernel build registered as TAG_* "
                            "(see the module doc).")


def load_kernel_builds(specs: list[str]) -> dict:
  """Registers each 'TAG:PATH' build of the direct-conv kernels under TAG; returns
  {TAG: loaded library} (keep them loaded). Errors name the flag value and what was
  expected."""
  import ctypes
  from sils_jax.models import direct_conv
  libs = {}
  for spec in specs:
    tag, sep, path = spec.partition(":")
    if not sep or not tag.isidentifier() or not path:
      raise ValueError(f"--kernels={spec!r}: expected TAG:PATH with TAG an identifier, e.g. old:/tmp/old.so")
    if tag == direct_conv.OWN_PREFIX:
      raise ValueError(f"--kernels={spec!r}: TAG {tag!r} is the name of this tree's own build")
    try:
      libs[tag] = ctypes.CDLL(os.path.abspath(path))
      direct_conv.register(libs[tag], tag)
    except (OSError, AttributeError) as e:  # no such file / not a kernel build
      raise ValueError(f"--kernels={spec!r}: cannot load a direct-conv kernel build from {path}: {e}") from None
  return libs


def _value(text: str):
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_variant(spec: str) -> tuple[str, dict, dict, dict]:
  """'NAME:key=value,@option=value,%module.attr=value' -> (name, config overrides,
  compiler options, module attributes). A value may hold commas inside brackets
  ('%m.A=(1, 2)')."""
  name, sep, rest = spec.partition(":")
  if not sep or not name.strip():
    raise ValueError(f"--variant={spec!r}: expected NAME:[key=value,@option=value,%module.attr=value,...]")
  overrides, options, attrs = {}, {}, {}
  for item in filter(None, (s.strip() for s in _split_items(rest))):
    key, eq, value = item.partition("=")
    bare = key.lstrip("@%")
    if not eq or not bare or (key.startswith("%") and "." not in bare):
      raise ValueError(f"--variant={spec!r}: item {item!r} is not key=value, @option=value or "
                       "%module.attr=value")
    target = options if key.startswith("@") else attrs if key.startswith("%") else overrides
    target[bare] = _value(value)
  return name.strip(), overrides, options, attrs


def _split_items(text: str) -> list[str]:
  """Splits at the commas outside brackets."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return items + [text[start:]]


@contextlib.contextmanager
def module_attributes(attrs: dict):
  """Sets ``{'package.module.ATTR': value}`` for the duration, then restores them; an
  unknown module or attribute is a ValueError naming it."""
  saved = []
  try:
    for path, value in attrs.items():
      mod_name, _, attr = path.rpartition(".")
      try:
        mod = importlib.import_module(mod_name)
      except ImportError:
        raise ValueError(f"variant item %{path}: no module {mod_name!r}") from None
      if not hasattr(mod, attr):
        raise ValueError(f"variant item %{path}: module {mod_name!r} has no attribute {attr!r}")
      saved.append((mod, attr, getattr(mod, attr)))
      setattr(mod, attr, value)
    yield
  finally:
    for mod, attr, value in reversed(saved):
      setattr(mod, attr, value)


def apply_overrides(config, overrides: dict):
  """A copy of ``config`` with the dotted-key overrides set; unknown fields are errors."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise KeyError(f"variant override {key!r}: the config has no field {p!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"variant override {key!r}: the config has no field {leaf!r}")
    node[leaf] = value
  return config


def summarise(round_ms: dict[str, list[float]]) -> dict[str, dict]:
  """Per variant (in order): the median of its round medians and its ratio to the first."""
  import numpy as np
  med = {name: float(np.median(ms)) for name, ms in round_ms.items()}
  first = next(iter(med.values()))
  return {name: {"ms_median": round(m, 2), "ratio_to_first": round(m / first, 4),
                 "ms_rounds": [round(x, 1) for x in round_ms[name]]} for name, m in med.items()}


def max_rel_diff(metrics: dict, reference: dict) -> tuple[float, str | None]:
  """The largest |m - ref| / max(|ref|, 1e-6) over the float metrics of ``reference``
  (a metric missing from ``metrics`` counts as infinitely different), and its name
  (None when nothing differs)."""
  import numpy as np
  worst, worst_key = 0.0, None
  for key, ref in reference.items():
    b = np.asarray(ref, np.float64)
    if b.dtype.kind != "f":
      continue
    a = np.asarray(metrics[key], np.float64) if key in metrics else np.full_like(b, np.inf)
    diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))) if a.shape == b.shape else np.inf
    if np.isnan(diff):  # a NaN on either side is as different as it gets
      diff = np.inf
    if diff > worst:
      worst, worst_key = diff, key
  return worst, worst_key


def build(config, batch: int, options: dict, attrs: dict | None = None) -> dict:
  """``train_step.prepare_step``'s step, compiled with ``options`` (and traced with the
  module attributes ``attrs`` set), with its states and batch."""
  with module_attributes(attrs or {}):
    p_step, g, d, dev_batch = train_step.prepare_step(config, batch)
    t0 = time.perf_counter()
    compiled = p_step.lower(g, d, dev_batch).compile(options or None)
  return {"compiled": compiled, "g": g, "d": d, "batch": dev_batch, "metrics": None,
          "compile_s": round(time.perf_counter() - t0, 2)}


def run_steps(s: dict, n: int, timed: bool) -> list[float]:
  import jax
  times = []
  for _ in range(n):
    t = time.perf_counter()
    s["g"], s["d"], s["metrics"] = s["compiled"](s["g"], s["d"], s["batch"])
    if timed:
      jax.block_until_ready((s["g"], s["d"], s["metrics"]))
      times.append((time.perf_counter() - t) * 1e3)
  jax.block_until_ready((s["g"], s["d"], s["metrics"]))
  return times


def time_rounds(states: dict, rounds: int, steps: int) -> dict[str, list[float]]:
  """Round-robin timing of compiled variants (``build``'s dicts, warmed up): in each
  round every variant runs ``steps`` synchronised steps; prints one JSON line per
  round and returns each variant's round medians (ms)."""
  import numpy as np
  round_ms = {name: [] for name in states}
  for r in range(rounds):
    for name, s in states.items():
      round_ms[name].append(float(np.median(run_steps(s, steps, timed=True))))
    print(json.dumps({"round": r, **{n: round(ms[-1], 1) for n, ms in round_ms.items()}}), flush=True)
  return round_ms


def main(argv):
  del argv
  memory = train_step.apply_memory_flag()  # before jax touches a device
  import jax
  import numpy as np
  try:
    specs = [parse_variant(v) for v in FLAGS.variant]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if len(specs) < 2 or len({s[0] for s in specs}) != len(specs):
    raise app.UsageError("give at least two --variant=NAME:... with distinct names")
  if FLAGS.rounds < 1 or FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise app.UsageError(f"--rounds and --steps must be >= 1 and --warmup >= 0, got "
                         f"{FLAGS.rounds}, {FLAGS.steps}, {FLAGS.warmup}")
  try:
    kernel_libs = load_kernel_builds(FLAGS.kernels)  # kept loaded while the variants run
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from sils_jax.models import direct_conv
  builds = sorted({direct_conv.OWN_PREFIX, *kernel_libs})
  base = FLAGS.config
  if FLAGS.image_size:
    base.image_size = FLAGS.image_size
  configs = {}
  for name, overrides, _, attrs in specs:  # every variant checked before any compiles
    try:
      configs[name] = apply_overrides(base, overrides)
      with module_attributes(attrs):
        pass
    except (KeyError, TypeError, ValueError) as e:  # unknown field or attribute; a wrong type
      raise app.UsageError(f"--variant={name}: {e.args[0]}") from None
    prefix = attrs.get("sils_jax.models.direct_conv.TARGET_PREFIX", direct_conv.OWN_PREFIX)
    if prefix not in builds:
      raise app.UsageError(f"--variant={name}: TARGET_PREFIX={prefix!r} is no loaded kernel build "
                           f"(loaded: {builds}); add --kernels={prefix}:PATH")
  states = {}
  for name, _, options, attrs in specs:
    config = configs[name]
    try:
      states[name] = build(config, FLAGS.batch, options, attrs)
    except jax.errors.JaxRuntimeError as e:
      if not options:
        raise
      raise app.UsageError(f"--variant={name} (compiler options {options}): {e}") from None
    run_steps(states[name], FLAGS.warmup, timed=False)
  huge_pages = train_step.apply_huge_pages_flag()  # the heap now holds every variant's step
  round_ms = time_rounds(states, FLAGS.rounds, FLAGS.steps)
  ref = {k: np.asarray(v) for k, v in next(iter(states.values()))["metrics"].items()}
  dev = jax.local_devices()[0]
  rows = summarise(round_ms)
  out = []
  for (name, overrides, options, attrs), row in zip(specs, rows.values()):
    metrics = {k: np.asarray(v) for k, v in states[name]["metrics"].items()}
    diff, key = max_rel_diff(metrics, ref)
    out.append({"name": name, "overrides": overrides, "options": options,
                "module_attributes": {k: repr(v) for k, v in attrs.items()}, **row,
                "compile_s": states[name]["compile_s"], "max_rel_metric_diff": diff,
                "max_rel_metric_diff_key": key})
  print(json.dumps({"summary": "ab_step", "device": f"{dev.platform}:{dev.device_kind}",
                    "device_count": jax.local_device_count(), "batch": FLAGS.batch,
                    "image_size": base.image_size, "rounds": FLAGS.rounds, "steps": FLAGS.steps,
                    "keep_freed_memory": memory, "huge_pages": huge_pages, "variants": out}), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
