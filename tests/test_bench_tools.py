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


def test_ab_step_reads_variants_overrides_and_compiler_options():
  from benchmarks import ab_step
  assert ab_step.parse_variant("base:") == ("base", {}, {}, {})
  name, overrides, options, attrs = ab_step.parse_variant(
      "x: conv_impl=xla, per_device_batch_size=2,@xla_cpu_enable_fast_math=false,gp_weight=0.5,"
      "%sils_jax.models.direct_conv.SMALL_IN_CHANNELS=(1, 3)")
  assert (name, overrides, options) == ("x", {"conv_impl": "xla", "per_device_batch_size": 2, "gp_weight": 0.5},
                                        {"xla_cpu_enable_fast_math": False})
  assert attrs == {"sils_jax.models.direct_conv.SMALL_IN_CHANNELS": (1, 3)}
  for bad in ("nocolon", ":conv_impl=xla", "x:conv_impl", "x:@=1", "x:%=1", "x:%NOMODULE=1"):
    with pytest.raises(ValueError, match="variant"):
      ab_step.parse_variant(bad)


def test_ab_step_module_attributes_are_set_for_the_block_then_restored():
  from benchmarks import ab_step
  from sils_jax.models import direct_conv
  before = direct_conv.SMALL_IN_CHANNELS
  with ab_step.module_attributes({"sils_jax.models.direct_conv.SMALL_IN_CHANNELS": ()}):
    assert direct_conv.SMALL_IN_CHANNELS == ()
  assert direct_conv.SMALL_IN_CHANNELS == before
  with pytest.raises(RuntimeError):  # restored when the block raises too
    with ab_step.module_attributes({"sils_jax.models.direct_conv.SMALL_IN_CHANNELS": ()}):
      raise RuntimeError
  assert direct_conv.SMALL_IN_CHANNELS == before
  for path, msg in (("sils_jax.models.direct_conv.NOPE", "no attribute 'NOPE'"), ("no_such_mod.X", "no module")):
    with pytest.raises(ValueError, match=msg):
      with ab_step.module_attributes({"sils_jax.models.direct_conv.SMALL_IN_CHANNELS": (), path: 1}):
        pass
    assert direct_conv.SMALL_IN_CHANNELS == before  # the first one set is restored


def test_ab_step_runs_a_second_kernel_build_under_its_own_prefix(tmp_path):
  import jax
  import numpy as np
  from benchmarks import ab_step
  from sils_jax.models import direct_conv
  if not direct_conv.available():
    pytest.skip(f"direct-conv kernels unavailable: {direct_conv.unavailable_reason()}")
  libs = ab_step.load_kernel_builds([f"other:{direct_conv._state['path']}"])
  assert libs
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 3))
  # a new function per trace, as ab_step's variants each build their own step (one jitted
  # function would be traced once and keep the first prefix)
  conv = lambda: jax.jit(lambda x, w: direct_conv.conv3x3(x, w))  # noqa: E731
  grad = lambda: jax.jit(jax.grad(lambda x, w: direct_conv.conv3x3(x, w).sum(), (0, 1)))  # noqa: E731
  ref, ref_grads = conv()(x, w), grad()(x, w)
  attr = "sils_jax.models.direct_conv.TARGET_PREFIX"
  with ab_step.module_attributes({attr: "other"}):  # read when traced
    np.testing.assert_array_equal(conv()(x, w), ref)
    for g, r in zip(grad()(x, w), ref_grads):
      np.testing.assert_array_equal(g, r)
  with ab_step.module_attributes({attr: "never_registered"}):  # the prefix is what is called
    with pytest.raises(jax.errors.JaxRuntimeError, match="never_registered_fwd"):
      conv()(x, w)
    with pytest.raises(jax.errors.JaxRuntimeError, match="never_registered_d"):
      grad()(x, w)
  not_a_build = tmp_path / "x.so"
  not_a_build.write_text("")
  for spec, msg in (("no_colon", "expected TAG:PATH"), ("1bad:/x.so", "expected TAG:PATH"),
                    ("sils_direct_conv:/x.so", "this tree's own build"),
                    (f"t:{tmp_path / 'missing.so'}", "cannot load"), (f"t:{not_a_build}", "cannot load")):
    with pytest.raises(ValueError, match=msg):
      ab_step.load_kernel_builds([spec])


def test_ab_step_overrides_a_copy_and_rejects_unknown_fields():
  import ml_collections
  from benchmarks import ab_step
  base = ml_collections.ConfigDict({"conv_impl": "auto", "opt": {"lr": 1e-4}})
  new = ab_step.apply_overrides(base, {"conv_impl": "xla", "opt.lr": 2e-4})
  assert (new.conv_impl, new.opt.lr) == ("xla", 2e-4)
  assert (base.conv_impl, base.opt.lr) == ("auto", 1e-4)
  for key, missing in (("conv_iml", "conv_iml"), ("opt.lrr", "lrr"), ("nope.lr", "nope")):
    with pytest.raises(KeyError, match=f"no field '{missing}'"):
      ab_step.apply_overrides(base, {key: 1})


def test_ab_step_summary_ratios_and_metric_differences():
  import numpy as np
  from benchmarks import ab_step
  rows = ab_step.summarise({"a": [100.0, 120.0, 110.0], "b": [90.0, 80.0, 200.0]})
  assert list(rows) == ["a", "b"]
  assert rows["a"]["ms_median"] == 110.0 and rows["b"]["ms_median"] == 90.0
  assert rows["b"]["ratio_to_first"] == pytest.approx(90 / 110, abs=1e-4)
  ref = {"loss": np.float32(2.0), "norm": np.float32(4.0), "finite": np.bool_(True)}
  assert ab_step.max_rel_diff(dict(ref), ref) == (0.0, None)
  assert ab_step.max_rel_diff({**ref, "norm": np.float32(5.0)}, ref) == (pytest.approx(0.25), "norm")
  assert ab_step.max_rel_diff({"loss": np.float32(2.0)}, ref) == (np.inf, "norm")
  assert ab_step.max_rel_diff({**ref, "loss": np.float32(np.nan)}, ref) == (np.inf, "loss")


def test_ab_transposes_swaps_in_the_plain_functions_and_restores_them():
  """The benchmark's 'autodiff' variant: the same conv to the second order, traced
  without the hand-written transposes; everything is put back afterwards."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import ab_transposes
  from sils_jax.models import conv, upsample
  modules = {"conv": conv, "upsample": upsample}
  before = {name: getattr(modules[m], name) for m, name in ab_transposes.SWAPPED}
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (4, 4, 16, 4)) * 0.1  # narrowing: shift form, scatter

  def r1(w):
    return jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(conv.conv2d(x, w, (2, 2), "SAME", "matmul"))))(x) ** 2)
  hand = jax.grad(r1)(w)
  with ab_transposes.autodiff_transposes():
    for m, name in ab_transposes.SWAPPED:
      assert getattr(modules[m], name) is before[name].fun
    plain = jax.grad(r1)(w)
    plain_jaxpr = str(jax.make_jaxpr(jax.grad(r1))(w))
  assert {name: getattr(modules[m], name) for m, name in ab_transposes.SWAPPED} == before
  np.testing.assert_allclose(plain, hand, rtol=1e-5, atol=1e-6)
  assert str(jax.make_jaxpr(jax.grad(r1))(w)) != plain_jaxpr


def test_streams_vmap_difference_is_relative_per_leaf_and_nan_is_infinite():
  import numpy as np
  from benchmarks import streams_vmap
  ref = [np.array([1.0, 2.0]), np.array([[100.0]])]
  assert streams_vmap.max_rel_diff(ref, ref) == 0.0
  assert streams_vmap.max_rel_diff([np.array([1.0, 2.1]), np.array([[100.0]])], ref) == pytest.approx(0.05)
  assert streams_vmap.max_rel_diff([np.array([1.0, np.nan]), np.array([[100.0]])], ref) == np.inf


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
  """train_step.model_flops on the tiny synthetic step (the reference forms, whatever
  form the config names): at most XLA's cost analysis of the same lowered step, which
  also counts elementwise work, and within 10% of it; the same count for every
  equivalent conv / up-conv form."""
  from benchmarks import train_step
  from tiny_config import tiny_config
  counts = set()
  for impl, up in (("xla", "transpose"), ("auto", "auto"), ("winograd", "subpixel")):
    c = tiny_config()
    c.conv_impl, c.upsample = impl, up
    counts.add(train_step.model_flops(c, 2))
  assert len(counts) == 1
  (count,) = counts
  ref = tiny_config()
  ref.conv_impl, ref.upsample = "xla", "transpose"
  p_step, g, d, b = train_step.prepare_step(ref, 2)
  cost = p_step.lower(g, d, b).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this jax's lowered cost analysis has no FLOPs")
  assert 0.9 * cost["flops"] <= count <= cost["flops"]
