"""FLOPs of a traced function, counted from its jaxpr: 2 x the multiply-adds of every
convolution and matrix product, at any nesting (jit, pmap / shard_map, scan, cond,
custom derivatives, remat).

A convolution counts only the products whose input is real: a kernel tap over
padding, or over the holes of an input dilation (a transposed convolution's gradient
form), is not a product. That is what XLA's cost analysis counts for a convolution.

``train_step.py`` counts the step traced with the reference forms, flax's
``nn.Conv`` and ``nn.ConvTranspose`` (``config.cpu_kernels='off'``;
``train_step.model_flops``), so that the number is the network's and does not depend
on which equivalent form runs: Winograd (``sils_jax/cpu_kernels``) does fewer products,
``train_step.py --conv=xla_pad``'s zero-padded input channels more, and the direct CPU
kernels are FFI calls that XLA's cost analysis does not see into. Elementwise work is
not counted.

A library, no command line:

  from benchmarks import flop_count
  flop_count.flops(jax.grad(loss), params, batch)   # traced, not run
"""

from __future__ import annotations

import math

import jax

try:
  from jax.extend import core as _core
except ImportError:  # pragma: no cover - older jax
  from jax import core as _core


def _valid_pairs(out: int, k: int, size: int, stride: int, pad_lo: int, lhs_dil: int,
                 rhs_dil: int) -> int:
  """Pairs (output position, kernel tap) of one spatial axis whose input is real."""
  last = (size - 1) * lhs_dil  # the dilated input's last position
  n = 0
  for o in range(out):
    for t in range(k):
      i = o * stride + t * rhs_dil - pad_lo
      if 0 <= i <= last and i % lhs_dil == 0:
        n += 1
  return n


def conv_flops(eqn) -> int:
  """2 x the real multiply-adds of one ``conv_general_dilated`` equation."""
  p = eqn.params
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  lhs_dil = p["lhs_dilation"] or (1,) * (len(lhs) - 2)
  rhs_dil = p["rhs_dilation"] or (1,) * (len(lhs) - 2)
  pairs = 1
  for a in range(len(lhs) - 2):
    pairs *= _valid_pairs(out[out_spec[2 + a]], rhs[rhs_spec[2 + a]], lhs[lhs_spec[2 + a]],
                          p["window_strides"][a], p["padding"][a][0], lhs_dil[a], rhs_dil[a])
  in_per_group = lhs[lhs_spec[1]] // p["feature_group_count"]
  return 2 * out[out_spec[0]] * out[out_spec[1]] * in_per_group * pairs


def dot_flops(eqn) -> int:
  """2 x the multiply-adds of one ``dot_general`` equation."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  contract = math.prod(lhs[d] for d in lc)
  batch = math.prod(lhs[d] for d in lb)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
  return 2 * batch * lhs_free * rhs_free * contract


def _sub(value):
  """The jaxprs held by one equation parameter."""
  if isinstance(value, _core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, _core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub(v)]
  return []


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of a (closed) jaxpr, as the module docstring counts them.

  Per-device bodies count once per device: a ``shard_map`` body (how ``jax.pmap``
  traces) is multiplied by its manual axes' sizes, so a pmapped step's count is the
  global batch's. ``scan`` bodies count ``length`` times, ``cond`` its costliest
  branch, ``while`` bodies once (their trip count is not static)."""
  if isinstance(jaxpr, _core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += conv_flops(eqn)
      continue
    if name == "dot_general":
      total += dot_flops(eqn)
      continue
    subs = [(k, j) for k, v in eqn.params.items() for j in _sub(v)]
    if not subs:
      continue
    if name == "cond":
      total += max(jaxpr_flops(j) for _, j in subs)
    elif name == "scan":
      total += eqn.params["length"] * sum(jaxpr_flops(j) for _, j in subs)
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("manual_axes") or eqn.params.get("newly_manual_axes") or mesh.axis_names
      times = math.prod(mesh.shape[a] for a in manual)
      total += times * sum(jaxpr_flops(j) for _, j in subs)
    elif name == "xla_pmap":  # older jax: pmap as its own primitive
      total += eqn.params["axis_size"] * sum(jaxpr_flops(j) for _, j in subs)
    else:
      # jit / pjit, custom_jvp_call, custom_vjp_call (the primal body; derivatives
      # are already equations of the traced gradient), remat, closed_call, while
      # (cond_jaxpr + body_jaxpr, once each)
      total += sum(jaxpr_flops(j) for _, j in subs)
  return total


def flops(fn, *args, **kwargs) -> int:
  """FLOPs of ``fn(*args, **kwargs)`` (arrays or ``jax.ShapeDtypeStruct``s): traced, not run."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
