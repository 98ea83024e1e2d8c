"""The benchmark helpers that turn raw measurements into reported numbers."""

import gzip
import json
import os

import pytest

from benchmarks import compare, trace_ops


def _write_trace(tmp_path, events):
  run = tmp_path / "plugins" / "profile" / "run1"
  os.makedirs(run)
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_top_ops_sums_by_name_per_process_per_step(tmp_path):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  kernels = [{"ph": "X", "pid": 1, "name": "conv_a", "dur": 3000}] * 4 + \
            [{"ph": "X", "pid": 1, "name": "fusion.1", "dur": 500}] * 2 + \
            [{"ph": "X", "pid": 1, "name": "fusion.22", "dur": 2000}]
  host = [{"ph": "X", "pid": 2, "name": "Execute", "dur": 5000},
          {"ph": "X", "pid": 2, "name": "$python.py:1 f", "dur": 99000},  # Python frame: skipped
          {"ph": "i", "pid": 2, "name": "instant"},                       # not a complete event
          {"ph": "X", "pid": 3, "name": "tiny", "dur": 100}]              # under 1 ms per step: dropped
  _write_trace(tmp_path, meta + kernels + host)
  out = trace_ops.top_ops(str(tmp_path), steps=2, top=1)
  assert set(out) == {"/device:GPU:0", "/host:CPU"}
  gpu = out["/device:GPU:0"]
  assert gpu["total_ms"] == pytest.approx((4 * 3.0 + 2 * 0.5 + 2.0) / 2)
  assert gpu["ops"] == [["conv_a", 6.0, 2.0]]  # top=1: only the largest, per step
  # by kind, instance suffixes dropped: fusion.1 and fusion.22 are one kind
  assert trace_ops.top_ops(str(tmp_path), steps=2, top=2)["/device:GPU:0"]["kinds"] == [
      ["conv_a", 6.0, 2.0], ["fusion", 1.5, 1.5]]
  assert out["/host:CPU"]["ops"] == [["Execute", 2.5, 0.5]]


def test_top_ops_without_a_trace_is_empty(tmp_path):
  assert trace_ops.top_ops(str(tmp_path), steps=3, top=5) == {}


def _row(framework, batch, img_per_s, dtype="float32", **kw):
  return {"framework": framework, "device": "gpu:H200" if framework == "jax" else "H200",
          "image_size": 128, "batch": batch, "img_per_s": img_per_s, "dtype": dtype,
          **({"mode": "eager"} if framework == "torch" else {"config": "synthetic"}), **kw}


def test_compare_pairs_each_jax_row_with_the_torch_eager_row_of_its_dtype():
  rows = [_row("jax", 64, 2000.0), _row("jax", 64, 3600.0, "bfloat16"),
          _row("jax", 64, 1500.0, config="synthetic_phases"),
          _row("torch", 64, 1000.0), _row("torch", 64, 1500.0, "bfloat16"),
          _row("torch", 64, 9999.0, mode="compile"),                  # not the eager peer
          _row("torch", 8, 10.0, error="compile failed"),            # failed: no pair
          _row("jax", 8, 800.0)]
  out = compare.summarise(rows)
  got = {(s["config"], s["batch"], s["dtype"]): s["ratio"] for s in out}
  assert got == {("synthetic", 64, "float32"): 2.0, ("synthetic", 64, "bfloat16"): 2.4,
                 ("synthetic_phases", 64, "float32"): 1.5}


def test_compare_pairs_repeats_with_their_own_torch_row_and_summarises_them():
  rows = []
  for i, (jax_ips, torch_ips) in enumerate([(6.0, 8.0), (9.0, 6.0), (7.0, 7.0)]):
    rows += [_row("jax", 8, jax_ips, repeat=i), _row("torch", 8, torch_ips, repeat=i)]
  rows.append(_row("jax", 1, 5.0, repeat=0))  # one repeat of a setting: no repeats line
  rows.append(_row("torch", 1, 4.0, repeat=0))
  pairs = compare.summarise(rows)
  assert [(s["batch"], s["repeat"], s["ratio"]) for s in pairs] == [(8, 0, 0.75), (8, 1, 1.5), (8, 2, 1.0),
                                                                   (1, 0, 1.25)]
  (rep,) = compare.summarise_repeats(pairs)
  assert (rep["batch"], rep["repeats"], rep["ratios"]) == (8, 3, [0.75, 1.5, 1.0])
  assert (rep["ratio_median"], rep["ratio_min"], rep["ratio_max"]) == (1.0, 0.75, 1.5)
  # an even count: the mean of the middle two
  assert compare.summarise_repeats(pairs[:2])[0]["ratio_median"] == pytest.approx(1.125, abs=1e-3)
  # rows without repeat tags (single runs, older files) pair as before, with no repeats line
  plain = [{k: v for k, v in r.items() if k != "repeat"} for r in rows[:2]]
  assert [s["ratio"] for s in compare.summarise(plain)] == [0.75]
  assert compare.summarise_repeats(compare.summarise(plain)) == []


# --- flop_count: every product counted is one that a ones-by-ones evaluation adds ---

def _each_product_once(eqn) -> int:
  """2 x the number of real products an equation computes: evaluated on all-ones
  operands, every output element sums exactly its real products (padding and
  dilation holes are zeros)."""
  import jax.numpy as jnp
  ones = [jnp.ones(v.aval.shape, v.aval.dtype) for v in eqn.invars]
  return 2 * int(round(float(jnp.sum(eqn.primitive.bind(*ones, **eqn.params)))))


def _product_eqns(jaxpr):
  from benchmarks import flop_count
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      yield eqn
    for v in eqn.params.values():
      for sub in flop_count._sub(v):
        yield from _product_eqns(sub)


@pytest.mark.parametrize("strides,padding,rhs_dil,groups,transpose", [
    ((1, 1), "SAME", (1, 1), 1, False),
    ((2, 2), "SAME", (1, 1), 1, False),
    ((2, 1), "VALID", (1, 1), 1, False),
    ((1, 1), ((2, 0), (1, 3)), (2, 1), 1, False),
    ((2, 2), "SAME", (1, 1), 2, False),
    ((2, 2), "SAME", (1, 1), 1, True),
])
def test_conv_flops_count_every_real_product_of_a_conv_and_its_gradients(strides, padding, rhs_dil,
                                                                       groups, transpose):
  """The forward conv, and the two gradient convs jax derives from it (input dilation
  for the input gradient, kernel dilation for the weight gradient), each counted
  against a ones-by-ones evaluation: products over padding or dilation holes are not
  counted, every real one is."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from benchmarks import flop_count
  x = jnp.ones((2, 9, 7, 4))
  if transpose:  # flax's transposed conv: an input-dilated conv forward
    m = nn.ConvTranspose(6, (4, 4), strides, padding=padding)
    p = m.init(jax.random.key(0), x)
    f = lambda p, x: jnp.sum(m.apply(p, x) ** 2)
    args = (p, x)
  else:
    w = jnp.ones((3, 4, 4 // groups, 6))
    f = lambda w, x: jnp.sum(jax.lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=rhs_dil, feature_group_count=groups,
        dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
    args = (w, x)
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args).jaxpr
  eqns = [e for e in _product_eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
  assert len(eqns) == 3
  for eqn in eqns:
    assert flop_count.conv_flops(eqn) == _each_product_once(eqn), eqn.params


def test_dot_flops_and_nesting():
  """dot_general with batch and contracting dims; jit / custom_vjp bodies count once,
  a scan body ``length`` times, a cond its costliest branch."""
  import jax
  import jax.numpy as jnp
  from benchmarks import flop_count
  a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 4))
  dot = 2 * 3 * 5 * 7 * 4
  eqn = next(_product_eqns(jax.make_jaxpr(jnp.matmul)(a, b).jaxpr))
  assert flop_count.dot_flops(eqn) == _each_product_once(eqn) == dot
  assert flop_count.flops(jax.jit(jnp.matmul), a, b) == dot

  @jax.custom_vjp
  def mm(a, b):
    return a @ b
  mm.defvjp(lambda a, b: (a @ b, (a, b)), lambda r, g: (g @ jnp.swapaxes(r[1], -1, -2), None))
  assert flop_count.flops(mm, a, b) == dot
  assert flop_count.flops(jax.grad(lambda a: jnp.sum(mm(a, b))), a) == 2 * dot

  def scanned(a, b):
    return jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=5)[1]
  assert flop_count.flops(scanned, a, b) == 5 * dot
  branches = lambda i, a, b: jax.lax.cond(i > 0, lambda: (a @ b) @ jnp.ones((3, 4, 4)), lambda: a @ b)
  assert flop_count.flops(branches, 1, a, b) == dot + 2 * 3 * 5 * 4 * 4


def test_flop_count_of_a_pmapped_step_is_the_global_batchs():
  """pmap traces as a shard_map whose body has one device's shapes: 8 fake devices,
  8 x one device's count (run in a subprocess, which gets the 8 devices)."""
  import subprocess
  import sys
  code = """
import jax, jax.numpy as jnp
from benchmarks import flop_count
assert jax.device_count() == 8
f = lambda a, b: jnp.tanh(a @ b)
one = flop_count.flops(f, jnp.ones((4, 5)), jnp.ones((5, 6)))
eight = flop_count.flops(jax.pmap(f, axis_name='i'), jnp.ones((8, 4, 5)), jnp.ones((8, 5, 6)))
assert one == 2 * 4 * 5 * 6 and eight == 8 * one, (one, eight)
print("ok")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_model_flops_of_the_step_match_xlas_cost_analysis_of_its_products():
  """train_step.model_flops on the tiny synthetic step (the reference forms, flax's
  layers, whatever config.cpu_kernels says): at most XLA's cost analysis of the same
  lowered step, which also counts elementwise work, and within 10% of it; the same
  count with the CPU forms ('auto') and 'off'."""
  from benchmarks import train_step
  from tiny_config import tiny_config
  counts = set()
  for mode in ("off", "auto"):
    c = tiny_config()
    c.cpu_kernels = mode
    counts.add(train_step.model_flops(c, 2))
  assert len(counts) == 1
  (count,) = counts
  ref = tiny_config()
  ref.cpu_kernels = "off"
  p_step, g, d, b = train_step.prepare_step(ref, 2)
  cost = p_step.lower(g, d, b).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this jax's lowered cost analysis has no FLOPs")
  assert 0.9 * cost["flops"] <= count <= cost["flops"]


@pytest.mark.parametrize("dtype,kernel,strides,use_bias,padded", [
    ("float32", (4, 4), (2, 2), False, 4),   # the encoders' and discriminators' first convs
    ("float32", (3, 3), (1, 1), True, 4),
    ("bfloat16", (4, 4), (2, 2), True, 8),  # 16-bit: a multiple of 8
])
def test_padded_conv_equals_nn_conv_on_the_same_params(dtype, kernel, strides, use_bias, padded):
  """train_step.PaddedConv (--conv=xla_pad): nn.Conv's parameters (same init, same tree),
  its values and gradients on 3 input channels, with the conv XLA runs taking the
  channels padded to ``padded``."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import train_step
  kw = dict(features=6, kernel_size=kernel, strides=strides, padding="SAME", use_bias=use_bias,
            dtype=jnp.dtype(dtype), bias_init=nn.initializers.normal(0.5))
  ref, pad = nn.Conv(**kw), train_step.PaddedConv(**kw)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, pad.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_array_equal(pad.init(jax.random.key(1), x)["params"]["kernel"], params["params"]["kernel"])
  tol = 1e-5 if dtype == "float32" else 2e-2
  want, got = ref.apply(params, x), pad.apply(params, x)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  g_want, g_got = jax.grad(loss(ref), argnums=(0, 1))(params, x), jax.grad(loss(pad), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10)
  convs = [e for e in jax.make_jaxpr(pad.apply)(params, x).jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert [e.invars[0].aval.shape[-1] for e in convs] == [padded]
  assert [e.invars[1].aval.shape[2] for e in convs] == [padded]
  assert train_step.conv_layers("xla_pad") == {"conv": train_step.PaddedConv}
  assert train_step.conv_layers("flax") is None
