"""Times the full training step (generator update + discriminator update).

  python benchmarks/train_step.py --config=configs/synthetic.py --batch=8 --steps=20
  python benchmarks/train_step.py --config=configs/synthetic.py --batch=1,8 --image_size=64

Prints one JSON object per (batch, image size) with: config, device, device_count,
batch (global), image_size, dtype, conv (--conv), cpu_forms (whether the
sils_jax/cpu_kernels forms ran), img_per_s (batch / median step time), ms_per_step
(median), ms_per_step_p10 / _p90, img_per_s_pipelined (steps dispatched back to back,
synchronised once at the end), compile_s (lowering + XLA compilation of the pmapped
step), peak_mem_bytes (device peak where the backend reports it, else the process's
peak RSS), gflop_per_step (the network's FLOPs, counted from the traced step in its
reference forms: ``model_flops``), tflop_per_s and, on GPUs whose peak we know, mfu.

The conv layers are the config's (``--conv=flax``: on the CPU backend with
``config.cpu_kernels='auto'`` the forms of ``sils_jax/cpu_kernels``, else flax's
``nn.Conv`` / ``nn.ConvTranspose``), or ``--conv=xla_pad``: every conv a ``PaddedConv``
(XLA's convolution with the input channels zero-padded for GPU tensor cores; same
values), a benchmark variant until a GPU times it (``device_run.sh``).

The step is exactly the one training runs (`sils_jax.training.step.train_step`,
pmapped over the local devices, states donated). The input is one fixed random batch
already on the devices: the input pipeline has its own benchmark
(`benchmarks/input_pipeline.py`). Nothing here needs TensorFlow.
"""

import functools
import json
import os
import resource
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import flop_count  # noqa: E402

FLAGS = flags.FLAGS
CONVS = ("flax", "xla_pad")  # --conv


def _define_flags():
  """Defined when run as a script, so that importing this module (tests) defines none."""
  config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Training config.")
  flags.DEFINE_list("batch", ["1"], "Global batch sizes (comma separated); each must divide by the device count.")
  flags.DEFINE_list("image_size", [], "Image sizes (default: the config's).")
  flags.DEFINE_integer("steps", 20, "Timed steps (each synchronised, for the median and spread).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_string("dtype", "", "compute_dtype override ('float32' or 'bfloat16').")
  flags.DEFINE_string("name", "", "Label for the 'config' field (default: the config file's name and variant).")
  flags.DEFINE_enum("conv", "flax", CONVS, "Conv layers: 'flax' = the models' layers for the config "
                    "(config.cpu_kernels: on the CPU backend with 'auto' the sils_jax/cpu_kernels forms, else "
                    "flax's nn.Conv / nn.ConvTranspose); 'xla_pad' = every conv a PaddedConv (input channels "
                    "zero-padded to a multiple of 4, 8 for 16-bit dtypes, for GPU tensor cores; same values), "
                    "up-convs flax's nn.ConvTranspose.")
  flags.DEFINE_integer("profile_steps", 0, "After timing, trace this many steps with jax.profiler and add "
                       "'top_ops' (time per step summed by op / kernel name) to the JSON (0: off).")
  flags.DEFINE_integer("profile_top", 25, "Ops listed in 'top_ops'.")
  define_memory_flag()


def define_memory_flag():
  """--keep_freed_memory and --huge_pages, as `python -m sils_jax.main` has them (there
  opt-in, default off; here default on)."""
  flags.DEFINE_bool("keep_freed_memory", True, "Let glibc keep freed memory between steps on a CPU-only "
                    "host, as `python -m sils_jax.main --keep_freed_memory` does "
                    "(sils_jax/cpu_kernels/memory.py).")
  flags.DEFINE_bool("huge_pages", True, "After the warm-up, back the heap with transparent huge pages, as "
                    "`python -m sils_jax.main --huge_pages` does after its first step "
                    "(sils_jax/cpu_kernels/memory.py).")


def _memory():
  """sils_jax.cpu_kernels.memory, or None where that plug-in package is not installed."""
  try:
    from sils_jax.cpu_kernels import memory
  except ImportError:
    return None
  return memory


def apply_memory_flag() -> str:
  """Applies --keep_freed_memory (before jax touches a device); returns what was done,
  reported as 'keep_freed_memory' in the JSON lines."""
  if not FLAGS.keep_freed_memory:
    return "off"
  memory = _memory()
  return memory.keep_freed_memory() if memory else "not set: sils_jax.cpu_kernels is not installed"


def apply_huge_pages_flag() -> str:
  """Applies --huge_pages (once the heap holds a step's memory: after the warm-up);
  returns what was done, reported as 'huge_pages' in the JSON lines."""
  if not FLAGS.huge_pages:
    return "off"
  memory = _memory()
  return memory.use_huge_pages() if memory else "not set: sils_jax.cpu_kernels is not installed"


class PaddedConv(nn.Module):
  """``nn.Conv`` (2-D, no groups or masks) with the input channels and the kernel's input
  rows zero-padded to a multiple of 4 (8 for 16-bit dtypes) before XLA's convolution:
  the same parameters (the kernel stays (kh, kw, Cin, F)) and values (zero channels
  meet zero kernel rows), in the shape cuDNN's tensor-core kernels need. The models'
  3-channel first convs ran on an H200 as an 'indexed' TF32 kernel taking 10.1 of the
  33.5 ms batch-64 step (benchmarks/README.md); not timed on a GPU yet, hence a
  benchmark variant (``--conv=xla_pad``), not a config value."""

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    if len(kernel_size) != 2:
      raise ValueError(f"PaddedConv is 2-D, got kernel_size {kernel_size}")
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, kernel_size + (cin, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    extra = -cin % (8 if jnp.dtype(x.dtype).itemsize == 2 else 4)
    if extra:  # zero input channels meet zero kernel rows: the same sums
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    lead = x.shape[:-3]  # nn.Conv's batch dimensions: any number
    padding = self.padding if isinstance(self.padding, str) else (
        ((self.padding, self.padding),) * 2 if isinstance(self.padding, int) else
        tuple(pair(p) for p in self.padding))
    y = jax.lax.conv_general_dilated(
        x.reshape((-1,) + x.shape[-3:]), kernel, pair(self.strides), padding,
        lhs_dilation=pair(self.input_dilation), rhs_dilation=pair(self.kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = y.reshape(lead + y.shape[1:])
    return y + bias if bias is not None else y


def conv_layers(conv: str) -> dict | None:
  """The ``layers`` argument of ``create_states`` for ``--conv``: None (the config's
  layers) for 'flax', PaddedConv for every conv for 'xla_pad'."""
  if conv not in CONVS:
    raise ValueError(f"--conv must be one of {CONVS}, got {conv!r}")
  return {"conv": PaddedConv} if conv == "xla_pad" else None


# Dense peak FLOP/s for MFU. Convolutions in float32 run as TF32 on these GPUs under
# jax's default matmul precision, so float32 steps are compared with the TF32 peak.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 494e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 494e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
}


def _peak(device_kind: str, dtype: str):
  for (name, dt), flops in PEAK_FLOPS.items():
    if name in device_kind and dt == dtype:
      return flops
  return None


def _peak_memory() -> tuple[int, str]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def model_flops(config, batch: int) -> int:
  """FLOPs of one training step of ``config`` at global ``batch``: every convolution's and
  matrix product's real multiply-adds x 2 (``flop_count``), counted on the step traced
  with the reference forms, flax's ``nn.Conv`` / ``nn.ConvTranspose``
  (``cpu_kernels='off'``), so that the count is the network's whatever equivalent form
  runs (Winograd, phase up-convs, the direct CPU kernels, which XLA's cost analysis does
  not see into; the zero channels of ``--conv=xla_pad``). Traced, not compiled or run."""
  ref = config.copy_and_resolve_references()
  ref.cpu_kernels = "off"
  p_step, g, d, dev_batch = prepare_step(ref, batch)
  return flop_count.flops(p_step, g, d, dev_batch)


def prepare_step(config, batch: int, layers: dict | None = None):
  """The pmapped training step of ``config`` (states donated), its replicated initial
  states and one fixed random batch of ``batch`` images on the local devices. Sets
  ``config.per_device_batch_size`` (pass a copy). ``layers``: the conv layer classes
  (``create_states``; default the config's). Returns (p_step, g, d, dev_batch)."""
  import numpy as np
  from sils_jax.training.devices import replicate, shard
  from sils_jax.training.state import AXIS, create_states, init_key
  from sils_jax.training.step import LossConfig, train_step

  n_dev = jax.local_device_count()
  if batch % n_dev:
    raise ValueError(f"--batch={batch} does not divide by the {n_dev} local devices")
  config.per_device_batch_size = batch // n_dev
  size, n_layers = config.image_size, len(config.layer_names)
  rng = np.random.default_rng(0)
  host_batch = {"x": rng.random((batch, size, size, 3), np.float32),
                "layers": rng.random((batch, n_layers, size, size, 3), np.float32)}
  g, d = create_states(config, init_key(config.seed), layers=layers)
  p_step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS,
                    donate_argnums=(0, 1))
  return p_step, replicate(g), replicate(d), shard(host_batch)


def bench(config, batch: int, image_size: int, steps: int, warmup: int, label: str, conv: str = "flax") -> dict:
  import numpy as np

  config = config.copy_and_resolve_references()
  config.image_size = image_size
  if FLAGS.dtype:
    config.compute_dtype = FLAGS.dtype
  n_layers = len(config.layer_names)
  layers = conv_layers(conv)
  if layers is None:  # the config's: recorded as 'cpu_forms' (the sils_jax/cpu_kernels forms ran)
    from sils_jax.training.state import conv_layers as config_layers
    layers = config_layers(config)
  p_step, g, d, dev_batch = prepare_step(config, batch, layers)
  n_dev = jax.local_device_count()
  t0 = time.perf_counter()
  lowered = p_step.lower(g, d, dev_batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = model_flops(config, batch)

  for _ in range(warmup):
    g, d, m = compiled(g, d, dev_batch)
  jax.block_until_ready((g, d, m))
  huge_pages = apply_huge_pages_flag()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    g, d, m = compiled(g, d, dev_batch)
    jax.block_until_ready((g, d, m))
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    g, d, m = compiled(g, d, dev_batch)
  jax.block_until_ready((g, d, m))
  pipelined = steps * batch / (time.perf_counter() - t)
  if not bool(np.all(np.asarray(m["finite"]))):
    raise FloatingPointError(f"non-finite step at batch {batch}, image size {image_size}")

  profile = None
  if FLAGS.profile_steps > 0:
    import tempfile
    with tempfile.TemporaryDirectory() as trace_dir:
      try:  # a profiler that cannot trace here costs the 'top_ops' field, not the timings
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
          for _ in range(FLAGS.profile_steps):
            g, d, m = compiled(g, d, dev_batch)
          jax.block_until_ready((g, d, m))
        from benchmarks import trace_ops
        profile = trace_ops.top_ops(trace_dir, FLAGS.profile_steps, FLAGS.profile_top)
      except Exception as e:  # noqa: BLE001
        profile = {"error": f"{type(e).__name__}: {e}"[:300]}

  ms = np.asarray(times) * 1e3
  med = float(np.median(ms))
  peak, peak_kind = _peak_memory()
  dev = jax.local_devices()[0]
  dtype = config.compute_dtype
  out = {"framework": "jax", "jax_version": jax.__version__, "config": label,
         "device": f"{dev.platform}:{dev.device_kind}", "device_count": n_dev, "batch": batch,
         "image_size": image_size, "num_layers": n_layers, "dtype": dtype, "conv": conv,
         "cpu_forms": conv == "flax" and bool(layers), "steps": steps,
         "img_per_s": round(batch / med * 1e3, 3), "ms_per_step": round(med, 3),
         "ms_per_step_p10": round(float(np.percentile(ms, 10)), 3),
         "ms_per_step_p90": round(float(np.percentile(ms, 90)), 3),
         "img_per_s_pipelined": round(pipelined, 3), "compile_s": round(compile_s, 2),
         "peak_mem_bytes": peak, "peak_mem_kind": peak_kind, "huge_pages": huge_pages}
  out["gflop_per_step"] = round(flops / 1e9, 3)  # model FLOPs, global batch (model_flops)
  achieved = flops / (med / 1e3)
  out["tflop_per_s"] = round(achieved / 1e12, 3)
  peak_flops = _peak(dev.device_kind, dtype) if dev.platform == "gpu" else None
  if peak_flops:
    out["mfu"] = round(achieved / (peak_flops * n_dev), 5)
    out["mfu_peak_tflop_per_s"] = peak_flops / 1e12
  if profile is not None:
    out["top_ops"] = profile
  return out


def main(argv):
  del argv
  memory = apply_memory_flag()
  config = FLAGS.config
  label = FLAGS.name or os.path.splitext(os.path.basename(
      flags.FLAGS["config"].config_filename.split(":")[0]))[0]
  variant = flags.FLAGS["config"].config_filename.partition(":")[2]
  if variant and not FLAGS.name:
    label += f":{variant}"
  sizes = [int(s) for s in FLAGS.image_size] or [config.image_size]
  for size in sizes:
    for b in FLAGS.batch:
      row = bench(config, int(b), size, FLAGS.steps, FLAGS.warmup, label, FLAGS.conv)
      row["keep_freed_memory"] = memory
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
