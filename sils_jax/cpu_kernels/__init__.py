"""Speed forms of the model's convolutions (mostly for the CPU): a plug-in wing, not
part of the model.

The models take their conv layers as module arguments (``conv=nn.Conv``,
``conv_transpose=nn.ConvTranspose``, as flax's examples/imagenet does). With
``config.cpu_kernels='auto'``, ``layers()`` returns drop-in replacements with the same
parameters and maths that run faster. On the CPU backend:

- ``conv.Conv``: patches x matrix and Winograd F(2x2, 2x2) forms (``conv.py``);
- ``upconv.ConvTranspose``: the 4x4 stride-2 up-conv in its phase form (``upconv.py``);
- both call the direct C++ FFI kernels (``ffi.py``, ``direct_conv.cc``) where those
  built and support the shape.

On other backends only the up-conv changes: its sub-pixel form (``upconv.py``), which
an H200 ran 2.9x faster in the step than flax's ``ConvTranspose``.

Which form each conv takes is a frozen ``Rules`` value passed to the modules. The
kernels are built once, here, before anything is traced, and the choice is logged.
Deleting this package leaves a project that trains (with plain flax layers).
Gains and how they were measured: benchmarks/README.md.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging

from sils_jax.cpu_kernels import ffi
from sils_jax.cpu_kernels.conv import Conv, Rules
from sils_jax.cpu_kernels.upconv import ConvTranspose

MODES = ("auto", "off")
_logged: set = set()


def rules(direct: bool = True) -> Rules:
  """The rules the model runs with: the direct kernels if ``direct`` and they load
  (built here, once per process), Winograd and matrix forms elsewhere."""
  return Rules(direct=direct and ffi.load())


def layers(mode: str, backend: str) -> dict[str, Any]:
  """The conv module arguments for the model (``conv``, ``conv_transpose``) for
  ``mode='auto'``: the CPU forms on the CPU backend, the sub-pixel up-conv elsewhere;
  ``{}`` (flax's own layers) for 'off'."""
  if mode not in MODES:
    raise ValueError(f"config.cpu_kernels must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return {}
  if backend != "cpu":
    return {"conv_transpose": functools.partial(ConvTranspose, form="subpixel")}
  r = rules()
  if r not in _logged:
    _logged.add(r)
    logging.info("CPU kernels: %s; Winograd F(2x2, 2x2) for the large 4x4 stride-2 convs, matrix forms "
                 "for the rest", "direct FFI kernels where they apply" if r.direct
                 else f"no direct FFI kernels ({ffi.unavailable_reason()})")
  return {"conv": functools.partial(Conv, rules=r), "conv_transpose": functools.partial(ConvTranspose, rules=r)}


__all__ = ["Conv", "ConvTranspose", "MODES", "Rules", "layers", "rules"]
