"""Mixed precision (config.compute_dtype): activations and convs in bfloat16;
parameters, optimizer state, BatchNorm statistics and losses in float32."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from tiny_config import tiny_config

from sils_jax.training import config_checks, loop
from sils_jax.training.state import create_states, init_key, make_discriminator, make_generator


def _bf16_config(**overrides):
  c = tiny_config()
  c.compute_dtype = "bfloat16"
  for k, v in overrides.items():
    c[k] = v
  return c


def _float_dtypes(tree) -> set[str]:
  return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)
          if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)}


def _operand_dtypes(jaxpr, primitive: str) -> set[tuple[str, ...]]:
  """The input dtypes of every ``primitive`` equation, also inside nested jaxprs."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found |= _operand_dtypes(sub, primitive)
  return found


def _conv_dtypes(jaxpr) -> set[tuple[str, ...]]:
  """Operand dtypes of the convolutions, whichever form they take (sils_jax/cpu_kernels):
  XLA convolutions or patches x kernel matrix products."""
  return _operand_dtypes(jaxpr, "conv_general_dilated") | _operand_dtypes(jaxpr, "dot_general")


def test_states_are_float32_with_bfloat16_compute():
  g_state, d_state = create_states(_bf16_config(), init_key(0))
  assert g_state.batch_stats, "the tiny config uses BatchNorm: batch_stats must exist"
  for name, tree in [("G params", g_state.params), ("G batch_stats", g_state.batch_stats),
                     ("G opt_state", g_state.opt_state), ("D params", d_state.params),
                     ("D opt_state", d_state.opt_state)]:
    assert _float_dtypes(tree) == {"float32"}, name


# 'off': flax's layers (XLA convolutions); 'auto': the CPU forms (matrix products; the
# direct FFI kernels are float32-only and leave bfloat16 convs to the matrix forms)
@pytest.mark.parametrize("cpu_kernels", ["off", "auto"])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_convs_run_in_compute_dtype_and_outputs_are_float32(compute_dtype, cpu_kernels):
  c = tiny_config()
  c.compute_dtype = compute_dtype
  c.cpu_kernels = cpu_kernels
  s, n = c.image_size, len(c.layer_names)
  gen, disc = make_generator(c, axis_name=None), make_discriminator(c)
  # abstract parameters: tracing needs no initialisation
  g_vars = jax.eval_shape(lambda: gen.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False))
  d_vars = jax.eval_shape(lambda: disc.init(jax.random.key(1), jnp.zeros((1, n, s, s, 3))))
  x, layers = jnp.zeros((2, s, s, 3)), jnp.zeros((2, n, s, s, 3))

  g_jaxpr = jax.make_jaxpr(lambda v, x: gen.apply(v, x, train=True, method="separate",
                                                  mutable=["batch_stats"]))(g_vars, x)
  assert _conv_dtypes(g_jaxpr.jaxpr) == {(compute_dtype, compute_dtype)}
  primitive = "conv_general_dilated" if cpu_kernels == "off" else "dot_general"
  assert _operand_dtypes(g_jaxpr.jaxpr, primitive)  # the form asked for is the one traced
  # BatchNorm statistics are reduced in float32 whatever the compute dtype
  assert _operand_dtypes(g_jaxpr.jaxpr, "reduce_sum") == {("float32",)}
  (codes, out), upd = jax.eval_shape(
      lambda v, x: gen.apply(v, x, train=True, method="separate", mutable=["batch_stats"]), g_vars, x)
  assert out.dtype == jnp.float32 and out.shape == (2, n, s, s, 3)
  assert codes[0][-1].dtype == jnp.dtype(compute_dtype)  # latent codes: losses cast them
  assert _float_dtypes(upd["batch_stats"]) == {"float32"}

  d_jaxpr = jax.make_jaxpr(lambda v, y: disc.apply(v, y))(d_vars, layers)
  assert _conv_dtypes(d_jaxpr.jaxpr) == {(compute_dtype, compute_dtype)}
  assert {str(v.aval.dtype) for v in d_jaxpr.jaxpr.outvars} == {"float32"}


def test_instance_norm_keeps_float32_statistics():
  c = _bf16_config(norm="instance")
  s = c.image_size
  gen = make_generator(c, axis_name=None)
  g_vars = jax.eval_shape(lambda: gen.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False))
  assert "batch_stats" not in g_vars and _float_dtypes(g_vars) == {"float32"}
  jaxpr = jax.make_jaxpr(lambda v, x: gen.apply(v, x, train=True))(g_vars, jnp.zeros((1, s, s, 3)))
  assert _conv_dtypes(jaxpr.jaxpr) == {("bfloat16", "bfloat16")}
  assert _operand_dtypes(jaxpr.jaxpr, "reduce_sum") == {("float32",)}


def _rows(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_bfloat16_training_is_finite_and_matches_float32_at_step_1(tmp_path):
  # log every step so that the first row of both runs is step 1 (same initial
  # parameters, same batch): the losses then differ only by bfloat16 rounding.
  loop_fields = dict(num_train_steps=20, log_every_steps=1, eval_every_steps=20,
                     checkpoint_every_steps=20)
  bf16_dir, f32_dir = str(tmp_path / "bf16"), str(tmp_path / "f32")
  result, g_state, d_state = loop.train_and_evaluate(_bf16_config(**loop_fields), bf16_dir,
                                                     return_states=True)
  assert result["step"] == 20
  mses = {k: v for k, v in result.items() if k.startswith("mse100_")}
  assert mses and all(math.isfinite(v) for v in mses.values()), result
  rows = _rows(bf16_dir)
  assert [r["step"] for r in rows] == list(range(1, 21))
  assert all(math.isfinite(r["g_total"]) and math.isfinite(r["d_total"]) for r in rows)
  # after training the state is still all float32
  assert _float_dtypes((g_state.params, g_state.opt_state, g_state.batch_stats,
                        d_state.params, d_state.opt_state)) == {"float32"}

  f32 = tiny_config()
  for k, v in dict(loop_fields, num_train_steps=1).items():
    f32[k] = v
  loop.train_and_evaluate(f32, f32_dir)
  first_bf16, first_f32 = rows[0], _rows(f32_dir)[0]
  assert first_bf16["step"] == first_f32["step"] == 1
  # measured: 0.05% apart (g_total 24.688 vs 24.676); 1% leaves a 20x margin
  np.testing.assert_allclose(first_bf16["g_total"], first_f32["g_total"], rtol=0.01)
  np.testing.assert_allclose(first_bf16["d_total"], first_f32["d_total"], rtol=0.01)


@pytest.mark.parametrize("value", ["float16", "bf16", "float64"])
def test_bad_compute_dtype_raises_config_error(value):
  c = tiny_config()
  c.compute_dtype = value
  with pytest.raises(config_checks.ConfigError, match="config.compute_dtype"):
    config_checks.validate(c)
