"""The VGG-19 weight converters against the frameworks that wrote the weights.

The real release files cannot be downloaded here, so each test writes a randomly
initialised VGG-19 in the release's layout and checks that our Flax ``VGG19`` with the
converted weights computes what the original framework computes from the same file:
Keras 3 (``KERAS_BACKEND=jax``, in a subprocess so that its backend choice stays out
of this session) for the Keras ``.h5``, torch for the torchvision ``.pth``.

Weights are He-normal (std sqrt(2 / fan_in)) so activations keep their scale through
the sixteen layers; the error measure is relative to that scale:
``max |ours - reference| / max |reference|`` over a layer's activations, required
below ``TOLERANCE``. Absolute errors are recorded too (``record_property`` and printed,
shown with ``pytest -s`` or in the junit XML).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sils_jax.models import vgg_weights
from sils_jax.models.vgg import BLOCKS, CONV_FEATURES, CONV_NAMES, TORCH_MEAN, TORCH_STD, VGG19

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("conv1_2", "conv3_2", "conv5_4")
TOLERANCE = 1e-4  # max abs error / max |reference activation|
INPUT_SHAPE = (2, 48, 64, 3)  # Keras' VGG19 needs >= 32 px; conv5_4 is then 3 x 4


def he_params(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in vgg_weights.kernel_shapes().items():
    fan_in = shape[0] * shape[1] * shape[2]
    params[name] = {"kernel": (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
                    "bias": rng.uniform(-0.1, 0.1, shape[-1:]).astype(np.float32)}
  return params


def write_keras_h5(path, params, skip=()):
  """The layout of Keras' vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 (Keras 2 writer)."""
  h5py = pytest.importorskip("h5py")
  layers = ["input_1"]
  for b, n in BLOCKS:
    layers += [f"block{b}_conv{i}" for i in range(1, n + 1)] + [f"block{b}_pool"]
  layers = [l for l in layers if l not in skip]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([l.encode() for l in layers])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.0.8"
    for layer in layers:
      g = f.create_group(layer)
      if "_conv" not in layer:
        g.attrs["weight_names"] = np.array([], dtype="S1")
        continue
      b, i = layer[len("block"):].split("_conv")
      p = params[f"conv{b}_{i}"]
      names = [f"{layer}_W_1:0", f"{layer}_b_1:0"]
      g.attrs["weight_names"] = np.array([n.encode() for n in names])
      g.create_dataset(names[0], data=p["kernel"])
      g.create_dataset(names[1], data=p["bias"])


def torch_features(torch):
  """torchvision's vgg19().features, He-normal initialised."""
  torch.manual_seed(0)
  layers, cin = [], 3
  for b, n in BLOCKS:
    if b > 1:
      layers.append(torch.nn.MaxPool2d(2, 2))
    for _ in range(n):
      conv = torch.nn.Conv2d(cin, CONV_FEATURES[b], 3, padding=1)
      torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
      torch.nn.init.uniform_(conv.bias, -0.1, 0.1)
      layers += [conv, torch.nn.ReLU(inplace=True)]
      cin = CONV_FEATURES[b]
  layers.append(torch.nn.MaxPool2d(2, 2))
  return torch.nn.Sequential(*layers).eval()


def ours(params, preprocess, x):
  with jax.default_matmul_precision("highest"):
    acts = VGG19(preprocess=preprocess).apply({"params": params}, x)
  return {k: np.asarray(acts[k]) for k in COMPARED}


def compare(record_property, label, got, ref):
  for name in COMPARED:
    assert got[name].shape == ref[name].shape, (name, got[name].shape, ref[name].shape)
    abs_err = float(np.max(np.abs(got[name] - ref[name])))
    scale = float(np.max(np.abs(ref[name])))
    assert scale > 1e-3, f"{label} {name}: reference activations vanished (max {scale})"
    record_property(f"{label}_{name}", f"abs {abs_err:.3g} rel {abs_err / scale:.3g} scale {scale:.3g}")
    print(f"{label} {name}: max abs error {abs_err:.3g}, relative {abs_err / scale:.3g}, max |a| {scale:.3g}")
    assert abs_err / scale < TOLERANCE, f"{label} {name}: relative error {abs_err / scale:.3g}"


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(1).uniform(0.0, 1.0, INPUT_SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def random_params():
  return he_params(0)


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory, random_params):
  params = random_params
  path = tmp_path_factory.mktemp("keras") / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
  write_keras_h5(path, params)
  return str(path), params


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  torch = pytest.importorskip("torch")
  features = torch_features(torch)
  state = {f"features.{k}": v for k, v in features.state_dict().items()}
  state["classifier.0.weight"] = torch.zeros(8, 4)  # the classifier is ignored
  path = tmp_path_factory.mktemp("torch") / "vgg19.pth"
  torch.save(state, path)
  return str(path), features


KERAS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras

    weights, image, out, model_h5, weights_h5 = sys.argv[1:]
    layers = {layers!r}
    x = np.load(image)
    model = keras.applications.VGG19(include_top=False, weights=weights, input_shape=x.shape[1:])
    probe = keras.Model(model.input, [model.get_layer(l).output for l in layers])
    acts = probe(keras.applications.vgg19.preprocess_input(x * 255.0), training=False)
    np.savez(out, **{{l: keras.ops.convert_to_numpy(a) for l, a in zip(layers, acts)}})
    model.save(model_h5)  # legacy whole-model .h5: weights nested under model_weights/
    model.save_weights(weights_h5)  # Keras 3 .weights.h5: layers/<auto name>/vars/0, 1
    print("keras", keras.__version__, keras.backend.backend())
""")


def test_keras_h5_matches_keras(keras_file, image, tmp_path, record_property):
  if importlib.util.find_spec("keras") is None:  # not imported here: its backend is chosen at import
    pytest.skip("keras is not installed (pip install keras)")
  path, random = keras_file
  params = vgg_weights.load_keras_h5(path)
  for name in CONV_NAMES:
    np.testing.assert_array_equal(params[name]["kernel"], random[name]["kernel"])
    np.testing.assert_array_equal(params[name]["bias"], random[name]["bias"])
  np.save(tmp_path / "x.npy", image)
  script = KERAS_SCRIPT.format(layers=[vgg_weights.keras_name(n) for n in COMPARED])
  env = dict(os.environ, KERAS_BACKEND="jax", KERAS_HOME=str(tmp_path / "keras_home"),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  files = [tmp_path / f for f in ("acts.npz", "model.h5", "model.weights.h5")]
  out = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "x.npy"), *map(str, files)],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "keras 3." in out.stdout and out.stdout.strip().endswith("jax"), out.stdout
  with np.load(files[0]) as ref:
    ref = {n: ref[vgg_weights.keras_name(n)] for n in COMPARED}
  compare(record_property, "keras", ours(params, "caffe", image), ref)
  # The comparison can fail: an H <-> W swap of the first kernel is far outside the tolerance.
  swapped = dict(params, conv1_1={"kernel": params["conv1_1"]["kernel"].transpose(1, 0, 2, 3),
                                  "bias": params["conv1_1"]["bias"]})
  with jax.default_matmul_precision("highest"):
    wrong = VGG19(preprocess="caffe", stop_after="conv1_2").apply({"params": swapped}, image)
  assert np.max(np.abs(np.asarray(wrong["conv1_2"]) - ref["conv1_2"])) / np.max(np.abs(ref["conv1_2"])) > 1e-2
  # What Keras 3 itself writes: the nested legacy layout and the .weights.h5 layout.
  for written in files[1:]:
    again = vgg_weights.load_keras_h5(str(written))
    for name in CONV_NAMES:
      np.testing.assert_array_equal(again[name]["kernel"], random[name]["kernel"], err_msg=f"{written} {name}")
      np.testing.assert_array_equal(again[name]["bias"], random[name]["bias"], err_msg=f"{written} {name}")


def test_torch_state_dict_matches_torch(torch_file, image, record_property):
  torch = pytest.importorskip("torch")
  path, features = torch_file
  params, preprocess = vgg_weights.load(path)
  assert preprocess == "torch"
  x = (image - np.asarray(TORCH_MEAN, np.float32)) / np.asarray(TORCH_STD, np.float32)
  h, ref = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), {}
  relu_after = {vgg_weights.TORCH_FEATURE_INDEX[n] + 1: n for n in COMPARED}
  with torch.no_grad():
    for index, layer in enumerate(features):
      h = layer(h)
      if index in relu_after:
        ref[relu_after[index]] = h.permute(0, 2, 3, 1).numpy().copy()
      if len(ref) == len(COMPARED):
        break
  compare(record_property, "torch", ours(params, "torch", image), ref)


def test_torch_checkpoint_wrappers(torch_file, tmp_path):
  torch = pytest.importorskip("torch")
  path, _ = torch_file
  plain = vgg_weights.load_torch_state_dict(path)
  state = torch.load(path, weights_only=True)
  wrapped = tmp_path / "checkpoint.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, wrapped)
  again = vgg_weights.load_torch_state_dict(str(wrapped))
  for name in CONV_NAMES:
    np.testing.assert_array_equal(again[name]["kernel"], plain[name]["kernel"])


def test_npz_round_trip(random_params, tmp_path):
  random = random_params
  out = str(tmp_path / "vgg19.npz")
  vgg_weights.save_npz(out, random, "caffe")
  params, preprocess = vgg_weights.load_npz(out)
  assert preprocess == "caffe"
  assert sorted(params) == sorted(CONV_NAMES)
  for name in CONV_NAMES:
    for k in ("kernel", "bias"):
      assert params[name][k].dtype == np.float32
      np.testing.assert_array_equal(params[name][k], random[name][k])
  assert vgg_weights.load(out)[1] == "caffe"
  with pytest.raises(ValueError, match="must end in .npz"):
    vgg_weights.save_npz(str(tmp_path / "vgg19.bin"), random, "caffe")
  with pytest.raises(ValueError, match="preprocess must be one of"):
    vgg_weights.save_npz(out, random, "tf")


def test_cli_converts_h5_and_pth(request, tmp_path):
  converted = {}  # each format whose writer (h5py, torch) is installed
  for fixture, out, preprocess in (("keras_file", "from_keras.npz", "caffe"),
                                   ("torch_file", "from_torch.npz", "torch")):
    try:
      converted[out] = (request.getfixturevalue(fixture)[0], preprocess)
    except pytest.skip.Exception:
      pass
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  runs = {}
  inputs = [(source, out) for out, (source, _) in converted.items()]
  inputs.append((str(tmp_path / "missing.h5"), "never.npz"))
  for source, out in inputs:
    cmd = [sys.executable, "-m", "sils_jax.models.vgg_weights", f"--input={source}",
           f"--output={tmp_path / out}"]
    runs[out] = (source, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, cwd=ROOT))  # run side by side
  results = {out: (source, *proc.communicate(timeout=300), proc.returncode)
             for out, (source, proc) in runs.items()}
  for out, (_, preprocess) in converted.items():
    source, stdout, stderr, rc = results[out]
    assert rc == 0, stderr[-3000:]
    assert f"wrote {tmp_path / out}" in stdout and f"preprocess={preprocess!r}" in stdout, stdout
    params, mode = vgg_weights.load_npz(str(tmp_path / out))
    direct, _ = vgg_weights.load(source)
    assert mode == preprocess
    for name in CONV_NAMES:
      np.testing.assert_array_equal(params[name]["kernel"], direct[name]["kernel"])
      np.testing.assert_array_equal(params[name]["bias"], direct[name]["bias"])
  source, stdout, stderr, rc = results["never.npz"]
  assert rc == 1 and f"error: {source}: no such file" in stderr, stderr[-3000:]
  assert not os.path.exists(tmp_path / "never.npz")


# ---------------------------------------------------------------- errors name the file

@pytest.mark.parametrize("name", ["vgg19.h5", "vgg19.pth", "vgg19.npz"])
def test_missing_file(tmp_path, name):
  path = str(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: no such file")):
    vgg_weights.load(path)


def test_unknown_extension(tmp_path):
  path = tmp_path / "vgg19.bin"
  path.write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match=re.escape(f"{path}: unknown extension '.bin', expected .h5")):
    vgg_weights.load(str(path))


def test_h5_missing_layer(tmp_path):
  path = tmp_path / "partial.h5"
  write_keras_h5(path, he_params(2), skip=("block3_conv2",))
  expected = f"{path}: no group 'block3_conv2' (expected the Keras VGG-19 notop layout"
  with pytest.raises(ValueError, match=re.escape(expected)):
    vgg_weights.load(str(path))


def test_h5_not_hdf5(tmp_path):
  pytest.importorskip("h5py")
  path = tmp_path / "vgg19.h5"
  path.write_text("not an HDF5 file")
  with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable HDF5 file")):
    vgg_weights.load(str(path))


def test_pth_wrong_kernel_shape(tmp_path):
  torch = pytest.importorskip("torch")
  shapes = vgg_weights.kernel_shapes()
  state = {}
  for name in CONV_NAMES[:CONV_NAMES.index("conv3_2") + 1]:
    kh, kw, cin, cout = shapes[name]
    if name == "conv3_2":
      cin = 128  # as if a layer were missing before it
    index = vgg_weights.TORCH_FEATURE_INDEX[name]
    state[f"features.{index}.weight"] = torch.zeros(cout, cin, kh, kw)
    state[f"features.{index}.bias"] = torch.zeros(cout)
  path = tmp_path / "vgg19.pth"
  torch.save(state, path)
  with pytest.raises(ValueError, match=re.escape(f"{path}: conv3_2 kernel") + ".* has shape "
                     + re.escape("(3, 3, 128, 256), expected (3, 3, 256, 256)")):
    vgg_weights.load(str(path))


def test_pth_pickled_model_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "model.pth"
  torch.save(torch.nn.Conv2d(3, 4, 3), path)  # a whole pickled module: weights_only refuses it
  with pytest.raises(ValueError, match=re.escape(f"{path}: torch.load(weights_only=True) could not read it")):
    vgg_weights.load(str(path))


def test_missing_optional_dependencies(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` raise ImportError
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=re.escape("pip install h5py")):
    vgg_weights.load_keras_h5(str(tmp_path / "vgg19.h5"))
  with pytest.raises(ImportError, match=re.escape("torch is an optional extra: pip install torch")):
    vgg_weights.load_torch_state_dict(str(tmp_path / "vgg19.pth"))
