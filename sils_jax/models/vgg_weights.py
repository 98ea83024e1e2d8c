"""Pretrained VGG-19 weights from the Keras and torchvision releases, as ``vgg.VGG19`` params.

Nothing here downloads: point ``load`` at a file you fetched yourself, or convert it
once to ``.npz`` so that later runs need neither h5py nor torch:

  python -m sils_jax.models.vgg_weights --input=FILE --output=vgg19.npz

The result of every loader is ``{conv_name: {'kernel': (3, 3, Cin, Cout) HWIO float32,
'bias': (Cout,) float32}}`` for the sixteen convolutions ``conv1_1`` ... ``conv5_4``
(``vgg.CONV_NAMES``), as numpy arrays: apply it with
``VGG19(preprocess=mode).apply({'params': params}, x)``. Each release expects its own
input scaling, so the loaders also say which ``preprocess`` mode goes with the weights.

Formats (``load`` picks one by the file's extension):

  .h5 / .hdf5   Keras, preprocess 'caffe'. The release file
                ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`` holds one HDF5
                group per layer (``block1_conv1`` ... ``block5_conv4``, listed in the
                root attribute ``layer_names``); each group's attribute ``weight_names``
                names its datasets, ``block1_conv1_W_1:0`` (kernel, already HWIO) and
                ``block1_conv1_b_1:0`` (bias). Keras 3's legacy writer nests them as
                ``block1_conv1/block1_conv1/kernel``; a whole model saved with
                ``model.save('x.h5')`` has the same groups under ``model_weights``; and
                Keras 3's ``model.save_weights('x.weights.h5')`` stores
                ``layers/<auto name>/vars/{0, 1}`` with the layer's name as the ``vars``
                group's attribute ``name``. All four are read. ``blockB_convI`` becomes
                ``convB_I``. Needs h5py.
  .pth / .pt    torchvision's ``vgg19`` state dict, preprocess 'torch'. Convolutions
                ``features.{0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32,
                34}.weight`` (OIHW, transposed here to HWIO) and ``.bias``; the classifier
                is ignored. Also accepted: a checkpoint dict holding the state dict under
                ``'state_dict'``, and keys prefixed ``module.`` (DataParallel). Read with
                ``torch.load(weights_only=True)``, which never runs pickled code. Needs
                torch (an optional extra).
  .npz          written by ``save_npz``: ``conv1_1/kernel``, ``conv1_1/bias``, ... and a
                string entry ``preprocess`` ('caffe' or 'torch'). Read with
                ``allow_pickle=False``.

Every problem with a file raises ``FileNotFoundError`` (no such file) or ``ValueError``
naming the file and what was expected there (a missing layer, a wrong shape, an
unreadable file).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from sils_jax.models.vgg import BLOCKS, CONV_FEATURES, CONV_NAMES, PREPROCESS

H5_EXTENSIONS = (".h5", ".hdf5")
TORCH_EXTENSIONS = (".pth", ".pt")
NPZ_EXTENSION = ".npz"
# torchvision's vgg19.features: conv, ReLU pairs with a max pool after each block, so
# the k-th convolution sits at index 2k plus one per pool before it.
TORCH_FEATURE_INDEX = dict(zip(CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)))
KERAS_LAYOUT = ("the Keras VGG-19 notop layout: one group per layer 'block1_conv1' ... 'block5_conv4' "
                "holding a 3x3 HWIO kernel and a bias")
TORCH_LAYOUT = ("torchvision's vgg19 state dict: 'features.N.weight' (OIHW) and 'features.N.bias' "
                f"for N in {tuple(TORCH_FEATURE_INDEX.values())}")

Params = dict[str, dict[str, np.ndarray]]


def kernel_shapes() -> dict[str, tuple[int, int, int, int]]:
  """``{conv_name: (3, 3, Cin, Cout)}`` of VGG-19."""
  shapes, cin = {}, 3
  for b, n in BLOCKS:
    for i in range(1, n + 1):
      shapes[f"conv{b}_{i}"] = (3, 3, cin, CONV_FEATURES[b])
      cin = CONV_FEATURES[b]
  return shapes


def keras_name(conv_name: str) -> str:
  """'conv3_2' -> 'block3_conv2'."""
  b, i = conv_name[len("conv"):].split("_")
  return f"block{b}_conv{i}"


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (expected pretrained VGG-19 weights)")


def _checked(path: str, name: str, kernel, bias, where: str = "") -> dict[str, np.ndarray]:
  """Float32 HWIO kernel and bias of ``name``, or a ValueError saying which shape was expected."""
  expected = kernel_shapes()[name]
  kernel, bias = np.asarray(kernel), np.asarray(bias)
  for what, array, shape in (("kernel", kernel, expected), ("bias", bias, expected[-1:])):
    if array.shape != shape:
      raise ValueError(f"{path}: {name} {what}{where} has shape {array.shape}, expected {shape}")
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f"{path}: {name} {what}{where} has dtype {array.dtype}, expected floating point")
  return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


# ---------------------------------------------------------------- Keras (HDF5)

def _import_h5py():
  try:
    import h5py
  except ImportError as e:
    raise ImportError("reading Keras .h5 weights needs h5py: pip install h5py") from e
  return h5py


def _keras_layer_groups(h5py, root) -> dict:
  """``{layer name: group holding its weights}`` for the legacy layouts and Keras 3's ``.weights.h5``."""
  if "model_weights" in root:  # a whole model saved with model.save('x.h5')
    root = root["model_weights"]
  if "layer_names" not in root.attrs and "layers" in root and isinstance(root["layers"], h5py.Group):
    groups = {}  # Keras 3 .weights.h5: layers/<auto name>/vars, attribute name = the layer's name
    for group in root["layers"].values():
      if isinstance(group, h5py.Group) and "vars" in group and "name" in group["vars"].attrs:
        groups[_text(group["vars"].attrs["name"])] = group["vars"]
    return groups
  return {name: group for name, group in root.items() if isinstance(group, h5py.Group)}


def _text(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _keras_arrays(h5py, group) -> list[np.ndarray]:
  """A layer's weights in Keras' order (``weight_names`` if the group lists them)."""
  if "weight_names" in group.attrs:
    return [np.asarray(group[_text(n)]) for n in group.attrs["weight_names"]]
  return [np.asarray(group[k]) for k in sorted(group, key=lambda k: (len(k), k))
          if isinstance(group[k], h5py.Dataset)]


def load_keras_h5(path: str) -> Params:
  """Params from the Keras VGG-19 ``.h5`` (see the module docstring); preprocess 'caffe'."""
  h5py = _import_h5py()
  _check_exists(path)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{path}: not a readable HDF5 file ({e}); expected {KERAS_LAYOUT}") from e
  with f:
    groups = _keras_layer_groups(h5py, f)
    params = {}
    for name in CONV_NAMES:
      layer = keras_name(name)
      if layer not in groups:
        raise ValueError(f"{path}: no group {layer!r} (expected {KERAS_LAYOUT})")
      try:
        arrays = _keras_arrays(h5py, groups[layer])
      except KeyError as e:
        raise ValueError(f"{path}: group {layer!r} lists a weight it does not hold ({e})") from e
      if len(arrays) != 2:
        raise ValueError(f"{path}: group {layer!r} holds {len(arrays)} arrays of shapes "
                         f"{[a.shape for a in arrays]}, expected a kernel and a bias")
      params[name] = _checked(path, name, arrays[0], arrays[1], f" (group {layer!r})")
  return params


# ---------------------------------------------------------------- torchvision (.pth)

def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading torchvision .pth weights needs torch "
                      "(torch is an optional extra: pip install torch)") from e
  return torch


def load_torch_state_dict(path: str) -> Params:
  """Params from torchvision's ``vgg19`` state dict (see the module docstring); preprocess 'torch'."""
  torch = _import_torch()
  _check_exists(path)
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many kinds (pickle, zip, runtime)
    raise ValueError(f"{path}: torch.load(weights_only=True) could not read it ({type(e).__name__}: "
                     f"{str(e)[:300]}); expected {TORCH_LAYOUT}, saved with torch.save(model.state_dict())") from e
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: holds a {type(state).__name__}, expected {TORCH_LAYOUT}")
  if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  if "features.1.running_mean" in state:
    raise ValueError(f"{path}: looks like vgg19_bn (batch norm at features.1), expected {TORCH_LAYOUT}")
  params = {}
  for name, index in TORCH_FEATURE_INDEX.items():
    keys = (f"features.{index}.weight", f"features.{index}.bias")
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(f"{path}: no {missing[0]!r} ({name}); expected {TORCH_LAYOUT}")
    weight, bias = (state[k] for k in keys)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
      raise ValueError(f"{path}: {keys[0]!r} or {keys[1]!r} is not a tensor; expected {TORCH_LAYOUT}")
    weight = weight.detach().cpu().float().numpy()
    if weight.ndim != 4:
      raise ValueError(f"{path}: {name} kernel ({keys[0]!r}) has shape {weight.shape}, expected 4-D OIHW "
                       f"{tuple(kernel_shapes()[name][i] for i in (3, 2, 0, 1))}")
    params[name] = _checked(path, name, weight.transpose(2, 3, 1, 0), bias.detach().cpu().float().numpy(),
                            f" ({keys[0]!r} as HWIO, OIHW {weight.shape})")
  return params


# ---------------------------------------------------------------- our .npz

def save_npz(path: str, params: Params, preprocess: str) -> None:
  """Writes ``params`` and their ``preprocess`` mode to ``path`` (must end in .npz), atomically."""
  if preprocess not in PREPROCESS:
    raise ValueError(f"{path}: preprocess must be one of {PREPROCESS}, got {preprocess!r}")
  if not path.endswith(NPZ_EXTENSION):
    raise ValueError(f"{path}: the output file name must end in {NPZ_EXTENSION}")
  arrays = {"preprocess": np.array(preprocess)}
  for name in CONV_NAMES:
    if name not in params:
      raise ValueError(f"{path}: params have no {name!r}, expected all of {CONV_NAMES}")
    checked = _checked(path, name, params[name]["kernel"], params[name]["bias"])
    arrays.update({f"{name}/{k}": v for k, v in checked.items()})
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_npz(path: str) -> tuple[Params, str]:
  """``(params, preprocess)`` from a file written by ``save_npz``."""
  _check_exists(path)
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - zip, pickle and format errors
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); "
                     "expected one written by sils_jax.models.vgg_weights") from e
  with data:
    if "preprocess" not in data.files:
      raise ValueError(f"{path}: no 'preprocess' entry; expected an .npz written by sils_jax.models.vgg_weights")
    preprocess = str(data["preprocess"])
    if preprocess not in PREPROCESS:
      raise ValueError(f"{path}: preprocess is {preprocess!r}, expected one of {PREPROCESS}")
    params = {}
    for name in CONV_NAMES:
      keys = (f"{name}/kernel", f"{name}/bias")
      missing = [k for k in keys if k not in data.files]
      if missing:
        raise ValueError(f"{path}: no {missing[0]!r}; expected an .npz written by sils_jax.models.vgg_weights")
      params[name] = _checked(path, name, data[keys[0]], data[keys[1]])
  return params, preprocess


# ---------------------------------------------------------------- any of them

def load(path: str) -> tuple[Params, str]:
  """``(params, preprocess)`` from a Keras .h5, a torchvision .pth or our .npz (by extension)."""
  ext = os.path.splitext(path)[1].lower()
  known = H5_EXTENSIONS + TORCH_EXTENSIONS + (NPZ_EXTENSION,)
  if ext not in known:
    raise ValueError(f"{path}: unknown extension {ext!r}, expected {' / '.join(H5_EXTENSIONS)} (Keras), "
                     f"{' / '.join(TORCH_EXTENSIONS)} (torchvision) or {NPZ_EXTENSION} "
                     "(converted by sils_jax.models.vgg_weights)")
  _check_exists(path)
  if ext in H5_EXTENSIONS:
    return load_keras_h5(path), "caffe"
  if ext in TORCH_EXTENSIONS:
    return load_torch_state_dict(path), "torch"
  return load_npz(path)


def convert(input_path: str, output_path: str) -> str:
  """Converts any file ``load`` reads to our .npz; returns a one-line summary."""
  if not output_path.endswith(NPZ_EXTENSION):  # before reading a large input
    raise ValueError(f"{output_path}: the output file name must end in {NPZ_EXTENSION}")
  params, preprocess = load(input_path)
  save_npz(output_path, params, preprocess)
  count = sum(p["kernel"].size + p["bias"].size for p in params.values())
  return (f"wrote {output_path}: {len(params)} convolutions ({CONV_NAMES[0]} ... {CONV_NAMES[-1]}), "
          f"{count:,} parameters, preprocess={preprocess!r}, from {input_path}")


# ---------------------------------------------------------------- command line

def _define_flags() -> None:
  # Defined only when run as a script: this module is also a library, and other CLIs
  # (separate.py) own flags of the same names.
  flags.DEFINE_string("input", None, "Pretrained VGG-19 weights: Keras .h5 or torchvision .pth (or an .npz).")
  flags.DEFINE_string("output", None, "The .npz to write.")
  flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    print(convert(flags.FLAGS.input, flags.FLAGS.output))
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
