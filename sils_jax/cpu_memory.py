"""Keeping the memory of one CPU step for the next (glibc's malloc settings).

XLA:CPU allocates a step's temporaries as one block (tens to hundreds of MB) and frees
it when the step ends. glibc serves a block that large with a fresh ``mmap`` and
unmaps it on ``free``, so every step touches new pages: 16 900 page faults per step at
128x128, batch 1; keeping the memory made the batch-8 step take 0.85-0.94 of the time
(``benchmarks/README.md``, the CPU section of 2026-12-06). With one malloc arena, no
``mmap`` and no trimming, the freed block stays in the heap and the next step reuses
it: no faults after the first steps. The process then keeps its peak memory until it
exits.

The settings must be made before XLA starts its CPU threads, which happens when jax
first touches a device (importing jax is fine): each thread that has allocated keeps
its own arena, whose heap cannot grow past 64 MB and maps large blocks afresh.
``python -m sils_jax.main`` and the step timers ``benchmarks/train_step.py`` (so also
``compare.py``), ``ab_step.py`` and ``ab_transposes.py`` call ``keep_freed_memory``
first; ``--keep_freed_memory=false`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEPT = False  # whether keep_freed_memory set them in this process


def kept() -> bool:
  """Whether this process keeps freed memory: ``keep_freed_memory`` set it, or the
  environment did (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0``). The fastest form of some
  convolutions depends on it (``sils_jax/models/conv.py``, 'auto')."""
  return _KEPT or (os.environ.get("MALLOC_ARENA_MAX") == "1" and os.environ.get("MALLOC_MMAP_MAX_") == "0")


def _accelerators_expected() -> str | None:
  """Why jax may run on something other than the CPU here (a name), else None: the
  settings are for the CPU step; on a GPU / TPU host the host side allocates little,
  and a single arena could slow many input threads."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    other = [p for p in platforms.split(",") if p.strip().lower() not in ("", "cpu")]
    return f"JAX_PLATFORMS={platforms}" if other else None
  if importlib.util.find_spec("jax_plugins") is not None or list(importlib.metadata.entry_points(group="jax_plugins")):
    return "a jax PJRT plugin (GPU) is installed"
  if importlib.util.find_spec("libtpu") is not None:
    return "libtpu is installed"
  return None


def keep_freed_memory() -> str:
  """Sets glibc's malloc to keep freed memory (module doc) when jax will run on the
  CPU. Returns what it did, for the log: 'set', or why not. Call it before jax first
  touches a device."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    this = " ".join(filter(None, (platform.system(), platform.libc_ver()[0])))
    return f"not set: needs Linux with glibc (this is {this})"
  reason = _accelerators_expected()
  if reason:
    return f"not set: {reason}"
  try:  # private jax API, used only to refuse a late call; if it moves, go on
    from jax._src import xla_bridge
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    return "not set: jax had already started its devices (call it before jax touches a device)"
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
  global _KEPT
  _KEPT = _KEPT or ok
  return "set" if ok else "not set: mallopt refused a setting"
