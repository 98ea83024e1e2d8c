"""Image reading, directory scans and the tfds builders, on tiny fake trees."""

import logging as pylogging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fake_trees import make_folder_tree, make_mit_tree, make_sir2_tree, write_png16
from sils_jax.data import builders, image_io, layouts, synthetic
from sils_jax.data.image_io import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER_OPTIONS = dict(dirs=("mixtures", "background", "reflection"),
                      layer_names=("background", "reflection"), blend_mode="additive",
                      test_dir="test")


def _files_under(path) -> list[str]:
  """Every file and folder under ``path`` (relative), or [] when it does not exist."""
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    for name in dirnames + filenames:
      out.append(os.path.relpath(os.path.join(dirpath, name), path))
  return sorted(out)


def _tf_loaded() -> bool:
  return any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)


def _rounded(v16: np.ndarray) -> np.ndarray:
  return np.round(v16.astype(np.float64) / 257.0).astype(np.uint8)


def _truncate(path: str, fraction: float = 0.6) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


def _garbage(path: str) -> None:
  with open(path, "wb") as f:
    f.write(b"this is not an image" * 10)


@pytest.fixture
def absl_logs(caplog):
  caplog.set_level(pylogging.INFO, logger="absl")
  return caplog


# ----------------------------------------------------------------------------
# image_io


def test_list_images_sorted_filtered(tmp_path):
  rgb = np.zeros((4, 5, 3), np.uint8)
  for name in ("b.png", "A.JPG", "c.jpeg", ".hidden.png"):
    Image.fromarray(rgb).save(tmp_path / name)
  (tmp_path / "notes.txt").write_text("x")
  (tmp_path / "sub.png").mkdir()  # a folder with an image-like name
  assert [os.path.basename(p) for p in image_io.list_images(str(tmp_path))] == [
      "A.JPG", "b.png", "c.jpeg"]


def test_list_images_errors(tmp_path):
  with pytest.raises(DataError, match="no such directory") as e:
    image_io.list_images(str(tmp_path / "missing"))
  assert str(tmp_path / "missing") in str(e.value)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(DataError, match=r"holds no image files \(expected .png/.jpg") as e:
    image_io.list_images(str(tmp_path / "empty"))
  assert str(tmp_path / "empty") in str(e.value)


def _conversion_cases(rng):
  """(name, writer(path), expected uint8 [H, W, 3], expected log fragments)."""
  rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  alpha = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  g16 = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
  c16 = rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
  a16 = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
  # Values around the rounding boundaries of v / 257 (128 -> 0 but 129 -> 1, ...).
  c16[0, :, 0] = [0, 128, 129, 255, 256, 65407, 65535]
  palette = Image.fromarray(rgb).quantize(colors=16)
  rep = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731
  return [
      ("rgb8", lambda p: Image.fromarray(rgb).save(p), rgb, []),
      ("gray8", lambda p: Image.fromarray(gray).save(p), rep(gray),
       ["grayscale image converted to RGB"]),
      ("rgba8", lambda p: Image.fromarray(np.dstack([rgb, alpha])).save(p), rgb,
       ["alpha channel dropped"]),
      ("la8", lambda p: Image.fromarray(np.dstack([gray, alpha]), "LA").save(p), rep(gray),
       ["alpha channel dropped", "grayscale image converted to RGB"]),
      ("palette", lambda p: palette.save(p), np.asarray(palette.convert("RGB")),
       ["palette image converted to RGB"]),
      ("gray16", lambda p: write_png16(p, g16), rep(_rounded(g16)),
       ["16-bit image scaled to 8 bit", "grayscale image converted to RGB"]),
      ("rgb16", lambda p: write_png16(p, c16), _rounded(c16),
       ["16-bit image scaled to 8 bit"]),
      ("rgba16", lambda p: write_png16(p, np.dstack([c16, a16])), _rounded(c16),
       ["16-bit image scaled to 8 bit", "alpha channel dropped"]),
      ("la16", lambda p: write_png16(p, np.dstack([g16, a16])), rep((g16 >> 8).astype(np.uint8)),
       ["16-bit gray+alpha image: pillow kept only the high byte", "alpha channel dropped",
        "grayscale image converted to RGB"]),
      ("bilevel", lambda p: Image.fromarray(gray > 127).save(p),
       rep(np.where(gray > 127, 255, 0).astype(np.uint8)),
       ["grayscale image converted to RGB"]),
  ]


@pytest.mark.parametrize("case", [c[0] for c in _conversion_cases(np.random.default_rng(0))])
def test_read_rgb_conversions_and_logs(tmp_path, absl_logs, case):
  name, write, expected, notes = next(
      c for c in _conversion_cases(np.random.default_rng(0)) if c[0] == case)
  path = str(tmp_path / f"{name}.png")
  write(path)
  image = image_io.read_rgb(path)
  assert image.dtype == np.uint8 and image.shape == expected.shape
  np.testing.assert_array_equal(image, expected)
  messages = [r.getMessage() for r in absl_logs.records if r.name == "absl"]
  for note in notes:
    assert sum(m.startswith(f"{path}: {note}") for m in messages) == 1, messages
  if not notes:
    assert not [m for m in messages if m.startswith(path)], messages
  # Read again: logged once per file, not once per read.
  image_io.read_rgb(path)
  again = [r.getMessage() for r in absl_logs.records if r.name == "absl"]
  assert len([m for m in again if m.startswith(path)]) == len(notes)


def test_rgb16_exact_rounding_differs_from_pillows_high_byte(tmp_path):
  v = np.array([[[255, 65407, 129]]], np.uint16)  # high bytes 0, 255, 0
  path = write_png16(str(tmp_path / "x.png"), v)
  np.testing.assert_array_equal(image_io.read_rgb(path), [[[1, 255, 1]]])
  np.testing.assert_array_equal(np.asarray(Image.open(path)), [[[0, 255, 0]]])


def test_read_mask(tmp_path):
  m8 = np.array([[0, 255, 3], [0, 0, 1]], np.uint8)
  Image.fromarray(m8).save(tmp_path / "m8.png")
  np.testing.assert_array_equal(image_io.read_mask(str(tmp_path / "m8.png")),
                                [[0, 1, 1], [0, 0, 1]])
  m16 = np.array([[0, 1], [65535, 0]], np.uint16)  # 1 / 257 rounds to 0 but is > 0
  write_png16(str(tmp_path / "m16.png"), m16)
  mask = image_io.read_mask(str(tmp_path / "m16.png"))
  assert mask.dtype == np.uint8
  np.testing.assert_array_equal(mask, [[0, 1], [1, 0]])
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[0, 0, 0] = 9
  rgb[1, 1, 1] = 9  # only the first channel counts
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(image_io.read_mask(str(tmp_path / "rgb.png")),
                                [[1, 0], [0, 0]])


def test_read_errors_name_the_path(tmp_path):
  good = np.zeros((40, 50, 3), np.uint8)
  good[::3] = 200
  Image.fromarray(good).save(tmp_path / "trunc.png")
  _truncate(str(tmp_path / "trunc.png"))
  _garbage(str(tmp_path / "garbage.png"))
  # The header of the truncated file is intact: cheap to size, fails to decode.
  assert image_io.image_size(str(tmp_path / "trunc.png")) == (40, 50)
  Image.fromarray(np.zeros((3, 4), np.float32)).save(tmp_path / "float.tif")
  with pytest.raises(DataError, match="unsupported pixel format") as e:
    image_io.read_rgb(str(tmp_path / "float.tif"))
  assert str(tmp_path / "float.tif") in str(e.value)
  for name, fn in (("trunc.png", image_io.read_rgb), ("garbage.png", image_io.read_rgb),
                   ("garbage.png", image_io.image_size), ("garbage.png", image_io.read_mask),
                   ("missing.png", image_io.read_rgb), ("missing.png", image_io.image_size)):
    with pytest.raises(DataError) as e:
      fn(str(tmp_path / name))
    assert str(e.value).startswith(str(tmp_path / name)), str(e.value)


def test_blend_modes_match_the_formulas():
  from sils_jax import blend
  assert layouts.BLEND_MODES == blend.MODES


# ----------------------------------------------------------------------------
# layouts


def test_scan_mit_default_split(tmp_path):
  root = make_mit_tree(tmp_path, objects=("cup2", "apple", "box", "cup1", "deer"), lights=2)
  layout = layouts.scan_mit_intrinsic(root)
  # Sorted objects apple, box, cup1, cup2, deer: even positions -> subset 1.
  assert layout.subset1 == ("apple", "cup1", "deer") and layout.subset2 == ("box", "cup2")
  assert layout.blend_mode == "multiplicative"
  assert layout.layer_names == ("albedo", "shading")
  assert [k for k, _ in layout.train_x] == [
      f"{o}/{n}" for o in ("apple", "cup1", "deer") for n in ("light01", "light02", "original")]
  assert layout.train_x[0][1] == os.path.join(root, "apple", "light01.png")
  assert [k for k, _ in layout.train_layers[0]] == ["box", "cup2"]
  assert layout.train_layers[0][0][1].endswith(os.path.join("box", "reflectance.png"))
  assert layout.train_layers[1][1][1].endswith(os.path.join("cup2", "shading.png"))
  assert [t.key for t in layout.test] == ["box", "cup2"]
  assert layout.test[0].mask.endswith(os.path.join("box", "mask.png"))
  assert layout.counts() == {"train_x": 9, "train_layer0": 2, "train_layer1": 2, "test": 2}


def test_scan_mit_given_subsets(tmp_path):
  root = make_mit_tree(tmp_path, lights=0)
  layout = layouts.scan_mit_intrinsic(root, subset1=("cup2", "apple"), subset2=("box",))
  assert layout.subset1 == ("apple", "cup2") and layout.subset2 == ("box",)
  assert [k for k, _ in layout.train_x] == ["apple/original", "cup2/original"]
  # Only one subset given: the other is every remaining object.
  layout = layouts.scan_mit_intrinsic(root, subset2=("box",))
  assert layout.subset1 == ("apple", "cup1", "cup2")


def _mit_case(tmp_path, case):
  """Makes a broken MIT tree; returns (manual_dir, scan kwargs, path expected in the
  message)."""
  root = make_mit_tree(tmp_path, lights=1)
  if case == "missing_manual_dir":
    return str(tmp_path / "nope"), {}, str(tmp_path / "nope")
  if case == "no_object_folders":
    for obj in os.listdir(root):
      shutil.rmtree(os.path.join(root, obj))
    return root, {}, root
  if case == "missing_file":
    os.remove(os.path.join(root, "cup1", "shading.png"))
    return root, {}, os.path.join(root, "cup1", "shading.png")
  if case == "unknown_object":
    return root, {"subset1": ("apple", "teapot")}, os.path.join(root, "teapot")
  if case == "object_in_both":
    return root, {"subset1": ("apple", "box"), "subset2": ("box",)}, os.path.join(root, "box")
  if case == "size_mismatch":
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(os.path.join(root, "box", "mask.png"))
    return root, {}, os.path.join(root, "box")
  if case == "garbage_header":
    _garbage(os.path.join(root, "box", "reflectance.png"))
    return root, {}, os.path.join(root, "box", "reflectance.png")
  raise ValueError(case)


MIT_CASES = ("missing_manual_dir", "no_object_folders", "missing_file", "unknown_object",
             "object_in_both", "size_mismatch", "garbage_header")


@pytest.mark.parametrize("case", MIT_CASES)
def test_scan_mit_errors(tmp_path, case):
  root, kwargs, path = _mit_case(tmp_path, case)
  with pytest.raises(DataError) as e:
    layouts.scan_mit_intrinsic(root, **kwargs)
  assert path in str(e.value)


def test_scan_sir2_default_split(tmp_path):
  root = make_sir2_tree(tmp_path, per_subdataset=3)
  layout = layouts.scan_sir2(root)
  keys = sorted(f"{s}/{i}" for s in layouts.SIR2_SUBDATASETS for i in (1, 2, 3))
  assert layout.subset1 == tuple(keys[0::2]) and layout.subset2 == tuple(keys[1::2])
  assert [k for k, _ in layout.train_x] == keys[0::2]
  assert [k for k, _ in layout.train_layers[0]] == keys[1::2]
  assert layout.train_x[1][1] == os.path.join(root, "PostcardDataset", "blended", "3.png")
  t = layout.test[0]
  assert t.key == "PostcardDataset/2" and t.mask is None
  assert t.x == os.path.join(root, "PostcardDataset", "blended", "2.jpg")  # JPEG mixture,
  assert t.layers == (os.path.join(root, "PostcardDataset", "transmission_layer", "2.png"),
                      os.path.join(root, "PostcardDataset", "reflection_layer", "2.png"))
  assert layout.blend_mode == "additive" and layout.layer_names == ("background", "reflection")


def test_scan_sir2_some_subdatasets_and_subsets(tmp_path):
  root = make_sir2_tree(tmp_path, per_subdataset=2)
  shutil.rmtree(os.path.join(root, "SolidObjectDataset"))
  shutil.rmtree(os.path.join(root, "WildSceneDataset"))
  layout = layouts.scan_sir2(root, subset1=("PostcardDataset/2",), subset2=("PostcardDataset/1",))
  assert [k for k, _ in layout.train_x] == ["PostcardDataset/2"]
  assert [t.key for t in layout.test] == ["PostcardDataset/1"]


def _sir2_case(tmp_path, case):
  root = make_sir2_tree(tmp_path, per_subdataset=2)
  post = os.path.join(root, "PostcardDataset")
  if case == "missing_manual_dir":
    return str(tmp_path / "nope"), {}, str(tmp_path / "nope")
  if case == "no_subdatasets":
    for s in layouts.SIR2_SUBDATASETS:
      shutil.rmtree(os.path.join(root, s))
    return root, {}, root
  if case == "missing_layer_file":
    os.remove(os.path.join(post, "reflection_layer", "2.png"))
    # The blended image is 2.jpg: the expected layer path has its name.
    return root, {}, os.path.join(post, "reflection_layer", "2.jpg")
  if case == "missing_layer_dir":
    shutil.rmtree(os.path.join(post, "transmission_layer"))
    return root, {}, os.path.join(post, "transmission_layer")
  if case == "size_mismatch":
    Image.fromarray(np.zeros((48, 63, 3), np.uint8)).save(
        os.path.join(post, "transmission_layer", "1.png"))
    return root, {}, os.path.join(post, "blended", "1.png")
  if case == "empty_dir":
    for f in os.listdir(os.path.join(post, "blended")):
      os.remove(os.path.join(post, "blended", f))
    return root, {}, os.path.join(post, "blended")
  if case == "unknown_key":
    return root, {"subset2": ("PostcardDataset/7",)}, os.path.join(root, "PostcardDataset/7")
  raise ValueError(case)


SIR2_CASES = ("missing_manual_dir", "no_subdatasets", "missing_layer_file",
              "missing_layer_dir", "size_mismatch", "empty_dir", "unknown_key")


@pytest.mark.parametrize("case", SIR2_CASES)
def test_scan_sir2_errors(tmp_path, case):
  root, kwargs, path = _sir2_case(tmp_path, case)
  with pytest.raises(DataError) as e:
    layouts.scan_sir2(root, **kwargs)
  assert path in str(e.value)


def test_scan_image_folders(tmp_path):
  root = make_folder_tree(tmp_path, layer_names=("a", "b", "c"), num_train=3, num_test=2,
                          blend="multiplicative")
  layout = layouts.scan_image_folders(
      root, ("mixtures", os.path.join(root, "a"), "b", "c"), ("a", "b", "c"),
      "multiplicative", test_dir=os.path.join(root, "test"))
  assert layout.counts() == {"train_x": 3, "train_layer0": 3, "train_layer1": 3,
                             "train_layer2": 3, "test": 2}
  assert layout.train_layers[0][2] == ("a/002.png", os.path.join(root, "a", "002.png"))
  assert layout.test[1].key == "t1"
  assert layout.test[1].layers[2] == os.path.join(root, "test", "c", "t1.png")
  assert layout.test[1].mask is None
  no_test = layouts.scan_image_folders(root, ("mixtures", "a", "b", "c"), ("a", "b", "c"),
                                       "additive")
  assert no_test.test == () and "test" not in no_test.counts()


def _folder_case(tmp_path, case):
  root = make_folder_tree(tmp_path, num_train=2, num_test=2)
  opts = dict(FOLDER_OPTIONS)
  if case == "missing_manual_dir":
    return str(tmp_path / "nope"), opts, str(tmp_path / "nope")
  if case == "wrong_number_of_dirs":
    opts["dirs"] = ("mixtures", "background")
    return root, opts, "dirs must name 3 folders"
  if case == "missing_dir":
    opts["dirs"] = ("mixtures", "background", "reflections")
    return root, opts, os.path.join(root, "reflections")
  if case == "empty_dir":
    for f in os.listdir(os.path.join(root, "background")):
      os.remove(os.path.join(root, "background", f))
    return root, opts, os.path.join(root, "background")
  if case == "missing_test_layer_file":
    os.remove(os.path.join(root, "test", "reflection", "t1.png"))
    return root, opts, os.path.join(root, "test", "reflection", "t1.png")
  if case == "size_mismatch":
    Image.fromarray(np.zeros((47, 64, 3), np.uint8)).save(
        os.path.join(root, "test", "background", "t0.png"))
    return root, opts, os.path.join(root, "test", "background", "t0.png")
  if case == "garbage_header":
    _garbage(os.path.join(root, "mixtures", "001.png"))
    return root, opts, os.path.join(root, "mixtures", "001.png")
  if case == "bad_blend_mode":
    opts["blend_mode"] = "screen"
    return root, opts, "blend_mode must be one of"
  raise ValueError(case)


FOLDER_CASES = ("missing_manual_dir", "wrong_number_of_dirs", "missing_dir", "empty_dir",
                "missing_test_layer_file", "size_mismatch", "garbage_header",
                "bad_blend_mode")


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_scan_image_folders_errors(tmp_path, case):
  root, opts, fragment = _folder_case(tmp_path, case)
  with pytest.raises(DataError) as e:
    layouts.scan_image_folders(root, **opts)
  assert fragment in str(e.value)


def test_training_images_may_differ_in_size(tmp_path):
  root = make_folder_tree(tmp_path, num_train=2, num_test=0)
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(os.path.join(root, "mixtures", "x.png"))
  layout = layouts.scan_image_folders(root, **dict(FOLDER_OPTIONS, test_dir=None))
  assert len(layout.train_x) == 3


# ----------------------------------------------------------------------------
# builders


def _check_examples(source, keys, reader):
  """Every example of a training split equals its source file."""
  assert len(source) == len(keys)
  for i, (key, path) in enumerate(keys):
    e = source[i]
    assert e["key"] == key
    assert e["image"].dtype == np.uint8 and e["image"].ndim == 3 and e["image"].shape[2] == 3
    np.testing.assert_array_equal(e["image"], reader(path))
    assert e["layers"].shape == (0, 0, 0, 3) and e["mask"].shape == (0, 0)


def _check_test_split(source, layout):
  assert len(source) == len(layout.test)
  for i, t in enumerate(layout.test):
    e = source[i]
    assert e["key"] == t.key
    np.testing.assert_array_equal(e["image"], image_io.read_rgb(t.x))
    assert e["layers"].dtype == np.uint8
    assert e["layers"].shape == (len(t.layers),) + e["image"].shape
    for k, path in enumerate(t.layers):
      np.testing.assert_array_equal(e["layers"][k], image_io.read_rgb(path))
    if t.mask is None:
      assert e["mask"].shape == (0, 0)
    else:
      assert e["mask"].dtype == np.uint8 and e["mask"].shape == e["image"].shape[:2]
      assert set(np.unique(e["mask"])) <= {0, 1}
      np.testing.assert_array_equal(e["mask"], image_io.read_mask(t.mask))


def _check_file_build(builder, layout):
  sources = builders.data_sources(builder)
  assert list(sources) == ["train_x"] + [f"train_layer{k}" for k in
                                         range(len(layout.layer_names))] + (
                                             ["test"] if layout.test else [])
  _check_examples(sources["train_x"], layout.train_x, image_io.read_rgb)
  for k, keys in enumerate(layout.train_layers):
    _check_examples(sources[f"train_layer{k}"], keys, image_io.read_rgb)
  if layout.test:
    _check_test_split(sources["test"], layout)
  assert builders.builder_layer_names(builder) == layout.layer_names
  assert builders.builder_blend_mode(builder) == layout.blend_mode
  assert builder.info.metadata["num_examples"] == layout.counts()
  assert not _tf_loaded()
  return sources


def test_mit_build(tmp_path):
  root = make_mit_tree(tmp_path, lights=2)
  builder = builders.prepare("mit_intrinsic", data_dir=str(tmp_path / "data"), manual_dir=root)
  layout = layouts.scan_mit_intrinsic(root)
  sources = _check_file_build(builder, layout)
  assert builders.builder_layer_names(builder) == ("albedo", "shading")
  assert builders.builder_blend_mode(builder) == "multiplicative"
  # Scene-disjoint: no object of train_x appears in the layer or test splits.
  x_objects = {sources["train_x"][i]["key"].split("/")[0] for i in range(len(sources["train_x"]))}
  assert x_objects == {"apple", "cup1"}
  for split in ("train_layer0", "train_layer1", "test"):
    objects = {e["key"] for e in sources[split]}
    assert objects == {"box", "cup2"} and not objects & x_objects
  meta = builder.info.metadata
  assert meta["subset1"] == ["apple", "cup1"] and meta["subset2"] == ["box", "cup2"]
  assert meta["has_mask"] is True and meta["options"]["manual_dir"] == root
  mask = sources["test"][0]["mask"]
  assert 0 < mask.sum() < mask.size
  # The stored shading is gray replicated to RGB.
  shading = sources["train_layer1"][0]["image"]
  assert (shading[..., 0] == shading[..., 2]).all()


def test_mit_8bit_and_explicit_subsets(tmp_path):
  root = make_mit_tree(tmp_path, lights=1, sixteen_bit=False)
  builder = builders.prepare("mit_intrinsic", data_dir=str(tmp_path / "data"), manual_dir=root,
                             subset1=("box", "cup1", "cup2"), subset2=("apple",))
  layout = layouts.scan_mit_intrinsic(root, ("box", "cup1", "cup2"), ("apple",))
  _check_file_build(builder, layout)


def test_sir2_build(tmp_path):
  root = make_sir2_tree(tmp_path, per_subdataset=3)
  builder = builders.prepare("sir2", data_dir=str(tmp_path / "data"), manual_dir=root)
  layout = layouts.scan_sir2(root)
  sources = _check_file_build(builder, layout)
  x_keys = {e["key"] for e in sources["train_x"]}
  for split in ("train_layer0", "train_layer1", "test"):
    assert not {e["key"] for e in sources[split]} & x_keys
  assert len(x_keys) + len(sources["test"]) == 9
  # The additive blend holds on the stored PNG triplets (not on the JPEG ones).
  e = sources["test"][1]  # test keys: Postcard/2, SolidObject/1, SolidObject/3, WildScene/2
  assert e["key"] == "SolidObjectDataset/1"
  np.testing.assert_array_equal(
      e["image"], np.clip(e["layers"].astype(int).sum(0), 0, 255).astype(np.uint8))


def test_image_folders_build(tmp_path):
  root = make_folder_tree(tmp_path, layer_names=("a", "b", "c"), num_train=3, num_test=2,
                          blend="multiplicative")
  options = dict(manual_dir=root, dirs=("mixtures", "a", "b", "c"), layer_names=("a", "b", "c"),
                 blend_mode="multiplicative", test_dir="test")
  builder = builders.prepare("image_folders", data_dir=str(tmp_path / "data"), **options)
  layout = layouts.scan_image_folders(root, options["dirs"], options["layer_names"],
                                      "multiplicative", "test")
  _check_file_build(builder, layout)
  assert builder.info.metadata["has_mask"] is False
  # Without test_dir there is no test split.
  del options["test_dir"]
  builder = builders.prepare("image_folders", data_dir=str(tmp_path / "data"), **options)
  assert "test" not in builders.data_sources(builder)


def test_synthetic_build(tmp_path):
  kwargs = dict(image_size=16, shapes=("square", "circle", "triangle"), num_train=3,
                num_test=2, seed=5)
  builder = builders.prepare("synthetic_shapes", data_dir=str(tmp_path / "data"), **kwargs)
  sources = builders.data_sources(builder)
  assert {k: len(v) for k, v in sources.items()} == {
      "train_x": 3, "train_layer0": 3, "train_layer1": 3, "train_layer2": 3, "test": 2}
  assert builders.builder_layer_names(builder) == ("square", "circle", "triangle")
  assert builders.builder_blend_mode(builder) == "additive"
  render = dict(image_size=16, shapes=kwargs["shapes"])
  for i in range(3):
    x, _ = synthetic.render_triplet(5, "train", 0, i, **render)
    e = sources["train_x"][i]
    assert e["key"] == f"{i:06d}" and e["image"].dtype == np.uint8
    np.testing.assert_array_equal(e["image"], np.round(x * 255).astype(np.uint8))
    for k in range(3):
      layer = synthetic.render_layer(5, "train", k + 1, i, k, **render)
      np.testing.assert_array_equal(sources[f"train_layer{k}"][i]["image"],
                                    np.round(layer * 255).astype(np.uint8))
  for i in range(2):
    x, layers = synthetic.render_triplet(5, "test", 0, i, **render)
    e = sources["test"][i]
    assert e["layers"].shape == (3, 16, 16, 3) and e["mask"].shape == (0, 0)
    # Quantisation error at most 0.5 / 255 per value.
    assert np.abs(e["image"] / 255.0 - x).max() <= 0.5 / 255 + 1e-7
    assert np.abs(e["layers"] / 255.0 - layers).max() <= 0.5 / 255 + 1e-7
    # Documented bound: |q(x) - sum_k q(L_k)| <= (N + 1) / 2 grey levels.
    assert np.abs(e["image"].astype(int) - e["layers"].astype(int).sum(0)).max() <= 2
  # Random access: negative indices, slices and grain's batched __getitems__.
  train_x = sources["train_x"]
  assert train_x[-1]["key"] == "000002" and [e["key"] for e in train_x[1:]] == ["000001", "000002"]
  assert [e["key"] for e in train_x.__getitems__([2, 0, -2])] == ["000002", "000000", "000001"]
  with pytest.raises(IndexError):
    train_x[3]
  assert not _tf_loaded()


def test_reuse_and_different_options_build_elsewhere(tmp_path, monkeypatch, absl_logs):
  root = make_mit_tree(tmp_path, lights=0)
  data_dir = str(tmp_path / "data")
  first = builders.prepare("mit_intrinsic", data_dir=data_dir, manual_dir=root)
  files = _files_under(data_dir)

  def fail(*args, **kwargs):
    raise AssertionError("rebuilt an existing dataset")

  monkeypatch.setattr(builders.MitIntrinsic, "_split_generators", fail)
  again = builders.prepare("mit_intrinsic", data_dir=data_dir, manual_dir=root)
  assert again.data_dir == first.data_dir and _files_under(data_dir) == files
  assert any("Reusing mit_intrinsic" in r.getMessage() for r in absl_logs.records)
  # Subset order does not matter: the same options, the same build.
  same = builders.MitIntrinsic(data_dir=data_dir, manual_dir=root,
                               subset1=("cup1", "apple"), subset2=("cup2", "box"))
  other = builders.MitIntrinsic(data_dir=data_dir, manual_dir=root,
                                subset1=("box", "cup1"), subset2=("cup2", "apple"))
  assert same.data_dir != first.data_dir  # explicit subsets are other options than None
  assert same.data_dir == builders.MitIntrinsic(
      data_dir=data_dir, manual_dir=root, subset1=("apple", "cup1"),
      subset2=("box", "cup2")).data_dir
  monkeypatch.undo()
  built = builders.prepare("mit_intrinsic", data_dir=data_dir, manual_dir=root,
                           subset1=("box", "cup1"), subset2=("cup2", "apple"))
  assert built.data_dir == other.data_dir != first.data_dir
  assert os.path.dirname(built.data_dir) != os.path.dirname(first.data_dir)
  assert builders.prepare("mit_intrinsic", data_dir=data_dir,
                          manual_dir=root).is_prepared()  # the first is still there
  assert {e["key"] for e in builders.data_sources(built)["test"]} == {"apple", "cup2"}
  # The reader needs only data_dir: a builder restored from its directory works.
  import tensorflow_datasets as tfds
  restored = tfds.builder_from_directory(built.data_dir)
  assert builders.builder_layer_names(restored) == ("albedo", "shading")
  assert len(builders.data_sources(restored)["train_x"]) == 2


def test_prepare_logs_what_it_builds(tmp_path, absl_logs):
  root = make_sir2_tree(tmp_path, per_subdataset=1)
  builders.prepare("sir2", data_dir=str(tmp_path / "data"), manual_dir=root)
  message = next(r.getMessage() for r in absl_logs.records
                 if r.getMessage().startswith("Building sir2"))
  assert root in message and "train_x 2 examples" in message and "test 1 examples" in message


def test_builder_pickles(tmp_path):
  builder = builders.prepare("synthetic_shapes", data_dir=str(tmp_path / "data"),
                             image_size=8, num_train=2, num_test=1)
  copy = pickle.loads(pickle.dumps(builder))
  assert copy.data_dir == builder.data_dir and copy.is_prepared()


def test_prepare_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset"):
    builders.prepare("mnist", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="subset1 must be a sequence"):
    builders.prepare("mit_intrinsic", data_dir=str(tmp_path), manual_dir=str(tmp_path),
                     subset1="apple")
  with pytest.raises(DataError, match="not built yet"):
    builders.data_sources(builders.SyntheticShapes(data_dir=str(tmp_path / "d"), image_size=8))
  assert _files_under(tmp_path / "d") == []


# Every bad input: a DataError naming the offending path, and data_dir left empty.
ERROR_CASES = ([("mit_intrinsic", c) for c in MIT_CASES]
               + [("sir2", c) for c in SIR2_CASES]
               + [("image_folders", c) for c in FOLDER_CASES])


@pytest.mark.parametrize("name,case", ERROR_CASES, ids=[f"{n}-{c}" for n, c in ERROR_CASES])
def test_prepare_errors_leave_nothing(tmp_path, name, case):
  maker = {"mit_intrinsic": _mit_case, "sir2": _sir2_case, "image_folders": _folder_case}[name]
  root, kwargs, fragment = maker(tmp_path, case)
  data_dir = tmp_path / "data"
  with pytest.raises(DataError) as e:
    builders.prepare(name, data_dir=str(data_dir), manual_dir=root, **kwargs)
  assert fragment in str(e.value)
  assert _files_under(data_dir) == []


@pytest.mark.parametrize("damage", ["truncated", "corrupt_pixels"])
def test_decode_error_while_building_cleans_up(tmp_path, damage):
  root = make_mit_tree(tmp_path, lights=1)
  data_dir = tmp_path / "data"
  # Something already in data_dir (another build) must survive.
  other = builders.prepare("synthetic_shapes", data_dir=str(data_dir), image_size=8,
                           num_train=1, num_test=1)
  before = _files_under(data_dir)
  # The test split comes last: the train splits are written before the failure.
  bad = os.path.join(root, "cup2", "mask.png")
  if damage == "truncated":
    _truncate(bad, 0.5)
  else:  # right length and header, corrupt compressed data
    with open(bad, "rb") as f:
      data = bytearray(f.read())
    start = data.index(b"IDAT") + 8
    data[start:len(data) - 16] = bytes(len(data) - 16 - start)
    with open(bad, "wb") as f:
      f.write(bytes(data))
  assert image_io.image_size(bad) == (48, 64)  # the scan cannot see it
  with pytest.raises(DataError) as e:
    builders.prepare("mit_intrinsic", data_dir=str(data_dir), manual_dir=root)
  assert str(e.value).startswith(bad), str(e.value)
  assert _files_under(data_dir) == before
  assert not os.path.exists(data_dir / "mit_intrinsic")
  assert other.is_prepared()
  # Once the file is fixed, the same call builds.
  Image.fromarray(np.zeros((48, 64), np.uint8)).save(bad)
  builder = builders.prepare("mit_intrinsic", data_dir=str(data_dir), manual_dir=root)
  assert len(builders.data_sources(builder)["test"]) == 2


NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.machinery
    import sys

    ATTEMPTS = []

    class BlockTensorFlow:
      # Answers find_spec for tensorflow (as if installed) but fails every import
      # of it, and records the attempt.
      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return importlib.machinery.ModuleSpec(name, self)
        return None

      def create_module(self, spec):
        ATTEMPTS.append(spec.name)
        raise ImportError(f"{{spec.name}} is blocked in this test")

      def exec_module(self, module):
        raise ImportError("blocked")

    sys.meta_path.insert(0, BlockTensorFlow())
    try:
      import tensorflow  # noqa: F401
      print("tensorflow imported")
    except ImportError:
      ATTEMPTS.clear()  # the check of the blocker itself
    sys.path.insert(0, {tests!r})
    from fake_trees import make_folder_tree
    from sils_jax.data import builders

    root = make_folder_tree(sys.argv[1], num_train=3, num_test=2)
    builder = builders.prepare(
        "image_folders", data_dir=sys.argv[2], manual_dir=root,
        dirs=("mixtures", "background", "reflection"),
        layer_names=("background", "reflection"), blend_mode="additive", test_dir="test")
    sources = builders.data_sources(builder)
    print("counts", {{k: len(v) for k, v in sources.items()}})
    print("test", sources["test"][1]["key"], sources["test"][1]["layers"].shape)
    builder = builders.prepare("synthetic_shapes", data_dir=sys.argv[2], image_size=8,
                               num_train=2, num_test=1)
    print("synthetic", len(builders.data_sources(builder)["train_layer1"]))
    print("import attempts:", ATTEMPTS)
    print("tensorflow loaded:", any(m == "tensorflow" or m.startswith("tensorflow.")
                                    for m in sys.modules))
""")


def test_build_and_read_with_tensorflow_blocked(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  script = NO_TF_SCRIPT.format(tests=os.path.join(ROOT, "tests"))
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "data")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "counts {'train_x': 3, 'train_layer0': 3, 'train_layer1': 3, 'test': 2}" in out.stdout
  assert "test t1 (2, 48, 64, 3)" in out.stdout
  assert "synthetic 2" in out.stdout
  assert "import attempts: []" in out.stdout
  assert "tensorflow loaded: False" in out.stdout
  assert "tensorflow imported" not in out.stdout
