"""glibc keeping freed memory between steps (sils_jax/cpu_memory.py)."""

import os
import platform
import subprocess
import sys

import jax
import pytest

from sils_jax import cpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# mallocs and frees a 100 MB block (as XLA:CPU does a step's temporaries; numpy would
# ask for huge pages) three times and prints the page faults of the last allocation
_SCRIPT = """
import ctypes, resource, sys
from sils_jax.cpu_memory import keep_freed_memory, kept
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
