"""glibc keeping freed memory between steps (sils_jax/cpu_kernels/memory.py)."""

import os
import platform
import subprocess
import sys

import jax
import pytest

from sils_jax.cpu_kernels import memory as cpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# mallocs and frees a 100 MB block (as XLA:CPU does a step's temporaries; numpy would
# ask for huge pages) three times and prints the page faults of the last allocation
_SCRIPT = """
import ctypes, resource, sys
from sils_jax.cpu_kernels.memory import keep_freed_memory, kept
if sys.argv[1] == "keep":
  print(keep_freed_memory())
print(kept())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 100 * 2 ** 20
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)  # touches every page
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
print(faults)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc settings")
def test_keep_freed_memory_reuses_a_freed_block_without_page_faults():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for k in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
    env.pop(k, None)
  faults = {}
  for mode in ("default", "keep"):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[:-1] == (["set", "True"] if mode == "keep" else ["False"]), lines
    faults[mode] = int(lines[-1])
  # 100 MB is 24 400 pages: each faulted in again by default, none when kept
  assert faults["default"] > 10_000 and faults["keep"] < 1_000, faults


def test_keep_freed_memory_is_left_alone_for_accelerators_and_after_jax_started(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  got = cpu_memory.keep_freed_memory()
  assert got == "not set: JAX_PLATFORMS=cuda,cpu" if GLIBC else got.startswith("not set: needs Linux")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  jax.devices()  # too late now: XLA's threads hold their own malloc arenas
  if GLIBC:
    assert cpu_memory.keep_freed_memory().startswith("not set: jax had already started")


# a freed 64 MB block stays in the kept heap; then the heap is backed with huge pages
_HUGE_SCRIPT = """
import ctypes
from sils_jax.cpu_kernels import memory as cpu_memory
assert cpu_memory.keep_freed_memory() == "set"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
print(cpu_memory._anon_huge_kb())
print(cpu_memory.use_huge_pages())
print(cpu_memory._anon_huge_kb())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's heap, Linux's transparent huge pages")
def test_use_huge_pages_backs_the_kept_heap_with_huge_pages():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _HUGE_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  before, message, after = out.stdout.strip().split("\n")
  mode = cpu_memory._thp_mode()
  if mode in (None, "never"):
    assert message.startswith("not set: transparent huge pages are"), message
    return
  if message.startswith("advised only"):  # a kernel before 6.1, or no free huge pages now
    pytest.skip(message)
  assert message.startswith("set: "), message
  gained_mb = (int(after) - int(before)) / 1024
  # the 64 MB block's heap, 2 MB-aligned: at least 60 MB more in huge pages (on an
  # 'always' host the heap may have had some already)
  assert gained_mb >= 60 or (mode == "always" and int(after) >= 60 * 1024), (before, message, after)


def test_use_huge_pages_needs_the_kept_heap_and_reads_the_kernel_settings(tmp_path, monkeypatch):
  monkeypatch.setattr(cpu_memory, "_KEPT", False)
  monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
  got = cpu_memory.use_huge_pages()
  assert got.startswith("not set: freed memory is not kept" if GLIBC else "not set: needs Linux"), got
  settings = tmp_path / "enabled"
  for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                     ("always madvise [never]\n", "never")):
    settings.write_text(text)
    assert cpu_memory._thp_mode(str(settings)) == mode
  assert cpu_memory._thp_mode(str(tmp_path / "missing")) is None
  if GLIBC:
    monkeypatch.setattr(cpu_memory, "_KEPT", True)
    monkeypatch.setattr(cpu_memory, "_thp_mode", lambda: "never")
    assert cpu_memory.use_huge_pages() == "not set: transparent huge pages are off (never) in this kernel"
  maps = tmp_path / "maps"  # a heap split in two mappings by an earlier madvise
  maps.write_text("55e000001000-55e000400000 rw-p 00000000 00:00 0                          [heap]\n"
                  "55e000400000-55e009300000 rw-p 00000000 00:00 0                          [heap]\n"
                  "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n")
  monkeypatch.setattr(cpu_memory, "_huge_page_bytes", lambda: 2 << 20)
  start, length = cpu_memory._heap_range(str(maps))
  assert start == 0x55E000200000 and start + length == 0x55E009200000
  assert cpu_memory._heap_range(str(tmp_path / "enabled")) is None
