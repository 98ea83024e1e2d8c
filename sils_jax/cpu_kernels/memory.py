"""Opt-in process settings for the CPU step: glibc keeps freed memory, huge pages.

XLA:CPU allocates a step's temporaries as one large block and frees it when the step
ends; glibc serves such blocks with a fresh ``mmap`` and unmaps them on ``free``, so
every step faults in new pages. ``keep_freed_memory`` sets one malloc arena, no
``mmap`` and no trimming (the same as ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647``), so the next step reuses the heap; it must run
before jax starts its CPU threads. ``use_huge_pages`` then backs that heap with
transparent huge pages (``madvise``). Both change the whole process, so they are
opt-in: ``python -m sils_jax.main --keep_freed_memory --huge_pages``; the step timers
in benchmarks/ set them. Neither changes any result. Measured gains:
benchmarks/README.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
import time

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# madvise advice (Linux's mman-common.h); MADV_COLLAPSE since Linux 6.1
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_THP_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"  # 2 MB on x86-64
_KEPT = False  # whether keep_freed_memory set them in this process


def kept() -> bool:
  """Whether this process keeps freed memory: ``keep_freed_memory`` set it, or the
  environment did (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0``)."""
  return _KEPT or (os.environ.get("MALLOC_ARENA_MAX") == "1" and os.environ.get("MALLOC_MMAP_MAX_") == "0")


def _not_linux_glibc() -> str | None:
  """Why glibc's malloc and Linux's madvise are not here (the log's 'not set' line), else None."""
  if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
    return None
  this = " ".join(filter(None, (platform.system(), platform.libc_ver()[0])))
  return f"not set: needs Linux with glibc (this is {this})"


def libc() -> ctypes.CDLL:
  """The C library, with errno kept for ``ctypes.get_errno`` and ``madvise`` /
  ``mprotect`` typed (address, length, int)."""
  lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  lib.madvise.argtypes = lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  return lib


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
  if (unsupported := _not_linux_glibc()):
    return unsupported
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
  c = libc()
  ok = all(c.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
  global _KEPT
  _KEPT = _KEPT or ok
  return "set" if ok else "not set: mallopt refused a setting"


def _thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None
  where the file is missing or unreadable."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
  return chosen[0] if chosen else None


def _huge_page_bytes() -> int:
  try:
    with open(_THP_SIZE) as f:
      return int(f.read())
  except (OSError, ValueError):
    return 2 << 20


def _heap_range(maps: str = "/proc/self/maps") -> tuple[int, int] | None:
  """The huge-page-aligned part of the process's brk heap (which may be several
  mappings once part of it was advised), as (start, length); None where there is none."""
  huge = _huge_page_bytes()
  spans = []
  with open(maps) as f:
    for line in f:
      if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        spans.append((lo, hi))
  if not spans:
    return None
  start = -(-min(lo for lo, _ in spans) // huge) * huge
  end = max(hi for _, hi in spans) // huge * huge
  return (start, end - start) if end > start else None


def _anon_huge_kb() -> int | None:
  try:
    with open("/proc/self/smaps_rollup") as f:
      for line in f:
        if line.startswith("AnonHugePages:"):
          return int(line.split()[1])
  except (OSError, ValueError):
    pass
  return None


def use_huge_pages() -> str:
  """Backs the heap, where ``keep_freed_memory`` keeps the step's memory, with
  transparent huge pages (module doc). Call it once the heap holds a step's memory
  (after the first step). Returns what it did, for the log: how much of the heap is
  now in huge pages and how long that took, or why nothing was done. Never raises:
  the step runs the same either way, only slower without."""
  if (unsupported := _not_linux_glibc()):
    return unsupported
  if not kept():
    return "not set: freed memory is not kept in the heap (keep_freed_memory was not set)"
  mode = _thp_mode()
  if mode in (None, "never"):
    return f"not set: transparent huge pages are {'off (never)' if mode else 'not available'} in this kernel"
  try:
    heap = _heap_range()
  except (OSError, ValueError) as e:
    return f"not set: cannot read the process's mappings ({e})"
  if heap is None:
    return "not set: the heap is smaller than one huge page"
  start, length = heap
  c = libc()
  if c.madvise(start, length, _MADV_HUGEPAGE) != 0:
    return f"not set: madvise(MADV_HUGEPAGE) failed ({os.strerror(ctypes.get_errno())})"
  t0 = time.perf_counter()
  if c.madvise(start, length, _MADV_COLLAPSE) != 0:
    err = ctypes.get_errno()
    # EINVAL: a kernel before 6.1; EAGAIN / ENOMEM: some ranges could not be collapsed
    # now. The heap stays advised: the kernel's khugepaged collapses it over time.
    return (f"advised only: MADV_COLLAPSE failed ({os.strerror(err)}); the kernel collapses "
            f"the {length >> 20} MB heap in the background")
  huge = _anon_huge_kb()
  held = f"{huge >> 10} MB of the process in huge pages" if huge is not None else "collapsed"
  return f"set: {length >> 20} MB heap, {held} ({time.perf_counter() - t0:.1f} s)"
