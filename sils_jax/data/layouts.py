"""Scanning a dataset directory into a pure-Python description of its splits.

A scan lists the files, checks everything that is cheap to check (directories
and files exist, every image header is readable, the images of one test triplet
have one size) and returns a :class:`Layout`. Nothing is decoded and nothing is
written: the builders (``builders.py``) scan first, so a bad directory fails
before any dataset directory exists.

Every layout has the same splits, following the paper's unpaired setting
(Sec. 5.1: "we do not have the data triplet from the three domains ... in the
training set"):

* ``train_x``: mixtures ``x`` (the images to separate);
* ``train_layers[k]``: images of layer ``k`` alone, unpaired with ``train_x``;
* ``test``: triplets ``(x, layers, mask)`` for evaluation.

For the two real data sets the paper splits the data "into two subsets without
overlapped scenes. Then we select the input images only from the first subset,
and the layer images only from the second. The test samples are from the second
subset." :func:`scan_mit_intrinsic` and :func:`scan_sir2` do exactly this:

* ``train_x``       <- subset 1 (mixtures only);
* ``train_layers``  <- subset 2 (layers only);
* ``test``          <- subset 2 (full triplets).

So no ``x`` of the training set has its layers in the training set, and the test
triplets' mixtures were never seen in training (their layers were).

Within each split, entries are sorted by key (plain string order), so a layout is
a deterministic function of the directory contents and the arguments.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

from absl import logging

from sils_jax.data.image_io import IMAGE_EXTENSIONS, DataError, image_size, list_images

# The blend modes of the paper's tasks; mirrors ``sils_jax.blend.MODES`` (data code
# does not import the formulas, a test checks that the two agree).
BLEND_MODES = ("additive", "multiplicative")

MIT_FILES = ("original.png", "reflectance.png", "shading.png", "mask.png")
MIT_LAYER_NAMES = ("albedo", "shading")
SIR2_SUBDATASETS = ("SolidObjectDataset", "PostcardDataset", "WildSceneDataset")
SIR2_DIRS = ("blended", "transmission_layer", "reflection_layer")
SIR2_LAYER_NAMES = ("background", "reflection")

_LIGHT = re.compile(r"^light\d+\.png$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Triplet:
  """One test example: mixture ``x``, one file per layer, optional 0/1 mask."""
  key: str
  x: str
  layers: tuple[str, ...]
  mask: str | None


@dataclasses.dataclass(frozen=True)
class Layout:
  """File lists of every split of one data set (paths are absolute).

  ``train_x`` and each ``train_layers[k]`` hold ``(key, path)`` pairs; keys are
  unique within a split. ``subset1`` / ``subset2`` record the two disjoint
  subsets of a two-subset split (objects for MIT, keys for SIR²); both are empty
  for layouts without one.
  """
  name: str
  layer_names: tuple[str, ...]
  blend_mode: str
  train_x: tuple[tuple[str, str], ...]
  train_layers: tuple[tuple[tuple[str, str], ...], ...]
  test: tuple[Triplet, ...]
  subset1: tuple[str, ...] = ()
  subset2: tuple[str, ...] = ()

  def counts(self) -> dict[str, int]:
    """Examples per split, with the builders' split names."""
    counts = {"train_x": len(self.train_x)}
    for k, layer in enumerate(self.train_layers):
      counts[f"train_layer{k}"] = len(layer)
    if self.test:
      counts["test"] = len(self.test)
    return counts


def _check_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such directory (expected {what})")
  return path


def _check_same_size(paths: Sequence[str], what: str) -> None:
  """Every file readable, all of one size (read from the headers)."""
  sizes = [image_size(p) for p in paths]
  if len(set(sizes)) > 1:
    listing = ", ".join(f"{p} is {h}x{w}" for p, (h, w) in zip(paths, sizes))
    raise DataError(f"{paths[0]}: the images of {what} must have one size (H x W), "
                    f"got {listing}")


def _check_headers(paths: Sequence[str]) -> None:
  for p in paths:
    image_size(p)


def check_subset(value, arg: str) -> tuple[str, ...] | None:
  """A subset argument as a tuple of strings (None stays None)."""
  if value is None:
    return None
  if isinstance(value, str):
    raise DataError(f"{arg} must be a sequence of names, got the string {value!r}")
  names = tuple(value)
  for name in names:
    if not isinstance(name, str):
      raise DataError(f"{arg} must hold strings, got {name!r}")
  if len(set(names)) != len(names):
    raise DataError(f"{arg} names an entry twice: {names!r}")
  return names


def _two_subsets(root: str, available: Sequence[str], subset1, subset2,
                 what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Resolves and checks the two disjoint subsets over ``available`` (sorted).

  Default (both None): alternate over the sorted names, even positions (0, 2,
  ...) to subset 1 and odd positions to subset 2. With only one of them given,
  the other is every remaining name.
  """
  subset1, subset2 = check_subset(subset1, "subset1"), check_subset(subset2, "subset2")
  available = sorted(available)
  known = set(available)
  for arg, subset in (("subset1", subset1), ("subset2", subset2)):
    for name in subset or ():
      if name not in known:
        raise DataError(
            f"{os.path.join(root, name)}: {what} {name!r} named in {arg} does not exist "
            f"(found {len(available)}: {', '.join(available)})")
  if subset1 is None and subset2 is None:
    subset1, subset2 = tuple(available[0::2]), tuple(available[1::2])
  elif subset2 is None:
    subset2 = tuple(n for n in available if n not in set(subset1))
  elif subset1 is None:
    subset1 = tuple(n for n in available if n not in set(subset2))
  both = sorted(set(subset1) & set(subset2))
  if both:
    raise DataError(
        f"{os.path.join(root, both[0])}: {what} {both[0]!r} is in both subset1 and "
        f"subset2; the subsets must be disjoint (the paper's unpaired split), shared: {both}")
  for arg, subset in (("subset1", subset1), ("subset2", subset2)):
    if not subset:
      raise DataError(f"{root}: {arg} is empty; the unpaired split needs at least one "
                      f"{what} in each subset (found {len(available)} in all)")
  unused = sorted(known - set(subset1) - set(subset2))
  if unused:
    logging.info("%s: %d %s(s) in neither subset, not used: %s", root, len(unused), what,
                 ", ".join(unused))
  return tuple(sorted(subset1)), tuple(sorted(subset2))


def scan_mit_intrinsic(manual_dir: str, subset1: Sequence[str] | None = None,
                       subset2: Sequence[str] | None = None) -> Layout:
  """MIT Intrinsic Images (Grosse et al. 2009), multiplicative ``x = albedo * shading``.

  Layout: one folder per object under ``manual_dir`` (hidden folders ignored),
  each holding ``original.png``, ``reflectance.png``, ``shading.png`` and
  ``mask.png`` (required) and optionally ``light01.png`` ... ``light10.png``
  (the object under single lights; other files such as ``diffuse.png`` are
  ignored). 20 objects with 11 images each are the paper's 220 images.

  Scene-disjoint unpaired split (paper Sec. 5.1), over objects:

  * ``train_x``: ``original.png`` and every ``lightNN.png`` of subset-1 objects,
    keys ``"<object>/original"``, ``"<object>/light01"``, ...;
  * ``train_layers``: ``reflectance.png`` ('albedo') and ``shading.png``
    ('shading') of subset-2 objects, key ``"<object>"``;
  * ``test``: subset-2 objects, ``x = original.png``, layers (reflectance,
    shading), ``mask = mask.png``.

  Documented default subsets (both None): the object folders sorted by name,
  alternating: positions 0, 2, 4, ... form subset 1 and 1, 3, 5, ... subset 2.
  Passing only one subset makes the other one every remaining object.

  Raises DataError (naming the path) when ``manual_dir`` is missing or has no
  object folders, an object folder lacks a required file, a subset names an
  object that does not exist or both subsets name one object, or an object's
  original/reflectance/shading/mask differ in size.
  """
  root = os.path.abspath(os.fspath(manual_dir))
  _check_dir(root, "the MIT Intrinsic Images folder with one subfolder per object")
  objects = sorted(n for n in os.listdir(root)
                   if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
  if not objects:
    raise DataError(f"{root}: holds no object folders (expected one folder per object "
                    f"with {', '.join(MIT_FILES)})")
  lights: dict[str, list[str]] = {}
  for obj in objects:
    folder = os.path.join(root, obj)
    for name in MIT_FILES:
      if not os.path.isfile(os.path.join(folder, name)):
        raise DataError(f"{os.path.join(folder, name)}: missing file (every MIT object "
                        f"folder needs {', '.join(MIT_FILES)})")
    _check_same_size([os.path.join(folder, n) for n in MIT_FILES], f"object {obj!r}")
    lights[obj] = sorted(n for n in os.listdir(folder) if _LIGHT.match(n))
  subset1, subset2 = _two_subsets(root, objects, subset1, subset2, "object")

  train_x = []
  for obj in subset1:
    folder = os.path.join(root, obj)
    train_x.append((f"{obj}/original", os.path.join(folder, "original.png")))
    for name in lights[obj]:
      path = os.path.join(folder, name)
      image_size(path)  # header readable
      train_x.append((f"{obj}/{os.path.splitext(name)[0].lower()}", path))
  albedo = tuple((obj, os.path.join(root, obj, "reflectance.png")) for obj in subset2)
  shading = tuple((obj, os.path.join(root, obj, "shading.png")) for obj in subset2)
  test = tuple(
      Triplet(key=obj, x=os.path.join(root, obj, "original.png"),
              layers=(os.path.join(root, obj, "reflectance.png"),
                      os.path.join(root, obj, "shading.png")),
              mask=os.path.join(root, obj, "mask.png"))
      for obj in subset2)
  return Layout(name="mit_intrinsic", layer_names=MIT_LAYER_NAMES,
                blend_mode="multiplicative", train_x=tuple(sorted(train_x)),
                train_layers=(albedo, shading), test=test, subset1=subset1, subset2=subset2)


def _by_stem(directory: str) -> dict[str, str]:
  """{file stem: path} of the images in ``directory``; a stem used twice is an error."""
  found: dict[str, str] = {}
  for path in list_images(directory):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in found:
      raise DataError(f"{path}: two images share the stem {stem!r} ({found[stem]} and "
                      f"{path}); files are matched across folders by stem, so it must "
                      f"be unique in a folder")
    found[stem] = path
  return found


def _match_layers(stem: str, x_path: str, layer_dirs: Sequence[str],
                  layer_files: Sequence[dict[str, str]]) -> tuple[str, ...]:
  """The layer files of mixture ``x_path`` (same stem), or DataError naming the
  expected path."""
  paths = []
  for directory, files in zip(layer_dirs, layer_files):
    if stem not in files:
      expected = os.path.join(directory, os.path.basename(x_path))
      raise DataError(
          f"{expected}: missing layer image for {x_path} (looked for the stem {stem!r} "
          f"with any of the extensions {'/'.join(IMAGE_EXTENSIONS)} in {directory})")
    paths.append(files[stem])
  return tuple(paths)


def scan_sir2(manual_dir: str, subset1: Sequence[str] | None = None,
              subset2: Sequence[str] | None = None) -> Layout:
  """SIR² reflection removal benchmark (Wan et al. 2017), additive
  ``x = background + reflection``.

  Layout (as commonly distributed, 454 images)::

    manual_dir/{SolidObjectDataset, PostcardDataset, WildSceneDataset}/
        {blended, transmission_layer, reflection_layer}/<stem>.<ext>

  Any non-empty subset of the three sub-datasets may be present. Within a
  sub-dataset, files are matched by stem (extensions may differ), the key of a
  triplet is ``"<SubDataset>/<stem>"``. Layers: 'background' =
  ``transmission_layer``, 'reflection' = ``reflection_layer``. Layer images with
  no blended image are ignored (logged).

  Unpaired two-subset split over keys, as in :func:`scan_mit_intrinsic`:
  ``train_x`` = blended images of subset 1, ``train_layers`` = transmission and
  reflection images of subset 2, ``test`` = subset-2 triplets (no masks).
  Documented default subsets (both None): the keys sorted, alternating (even
  positions subset 1, odd positions subset 2). SIR² file names do not encode
  scenes, so this default is not guaranteed scene-disjoint; pass ``subset1`` /
  ``subset2`` (tuples of keys) for a scene-aware split.

  Raises DataError (naming the path) when ``manual_dir`` is missing or holds none
  of the sub-datasets, a folder is missing or has no images, a blended image has
  no layer file of its stem, a subset names an unknown key or both subsets name
  one key, or the three images of a triplet differ in size.
  """
  root = os.path.abspath(os.fspath(manual_dir))
  _check_dir(root, f"the SIR² folder holding {', '.join(SIR2_SUBDATASETS)}")
  present = [s for s in SIR2_SUBDATASETS if os.path.isdir(os.path.join(root, s))]
  if not present:
    raise DataError(f"{root}: holds none of the SIR² sub-datasets "
                    f"{', '.join(SIR2_SUBDATASETS)} (each with {', '.join(SIR2_DIRS)})")
  triplets: dict[str, tuple[str, tuple[str, ...]]] = {}
  for sub in present:
    dirs = [_check_dir(os.path.join(root, sub, d), f"the SIR² folder {sub}/{d}")
            for d in SIR2_DIRS]
    files = [_by_stem(d) for d in dirs]
    for stem, x_path in sorted(files[0].items()):
      layers = _match_layers(stem, x_path, dirs[1:], files[1:])
      _check_same_size((x_path,) + layers, f"the triplet {sub}/{stem}")
      triplets[f"{sub}/{stem}"] = (x_path, layers)
    extra = sorted(set().union(*map(set, files[1:])) - set(files[0]))
    if extra:
      logging.warning("%s: %d layer image(s) without a blended image, not used: %s",
                      os.path.join(root, sub), len(extra), ", ".join(extra[:10]))
  subset1, subset2 = _two_subsets(root, list(triplets), subset1, subset2, "key")
  train_x = tuple((key, triplets[key][0]) for key in subset1)
  train_layers = tuple(tuple((key, triplets[key][1][k]) for key in subset2)
                       for k in range(len(SIR2_LAYER_NAMES)))
  test = tuple(Triplet(key=key, x=triplets[key][0], layers=triplets[key][1], mask=None)
               for key in subset2)
  return Layout(name="sir2", layer_names=SIR2_LAYER_NAMES, blend_mode="additive",
                train_x=train_x, train_layers=train_layers, test=test,
                subset1=subset1, subset2=subset2)


def check_layer_names(layer_names) -> tuple[str, ...]:
  """At least two distinct non-empty names, as a tuple."""
  if isinstance(layer_names, str) or layer_names is None:
    raise DataError(f"layer_names must be a sequence of names, one per layer, got "
                    f"{layer_names!r}")
  names = tuple(layer_names)
  if len(names) < 2 or not all(isinstance(n, str) and n for n in names) \
      or len(set(names)) != len(names):
    raise DataError(f"layer_names must be at least two distinct non-empty strings, got "
                    f"{names!r}")
  return names


def check_blend_mode(blend_mode) -> str:
  if blend_mode not in BLEND_MODES:
    raise DataError(f"blend_mode must be one of {BLEND_MODES}, got {blend_mode!r}")
  return blend_mode


def _resolve(root: str, path: str) -> str:
  return os.path.abspath(os.path.join(root, os.fspath(path)))


def scan_image_folders(manual_dir: str, dirs: Sequence[str], layer_names: Sequence[str],
                       blend_mode: str, test_dir: str | None = None) -> Layout:
  """The user's own task: one folder of mixtures and one folder per layer.

  ``dirs`` has ``len(layer_names) + 1`` entries: first the folder of mixtures,
  then one folder per layer, in ``layer_names`` order. Each is relative to
  ``manual_dir`` or absolute. Training images are unpaired: every folder may hold
  any number of images of any sizes; keys are ``"<folder name>/<file name>"``.

  ``test_dir`` (optional, relative to ``manual_dir`` or absolute) holds one
  subfolder per entry of ``dirs``, named like that entry's last path component
  (``dirs=("mix", "a/bg", "a/refl")`` -> ``test_dir/{mix, bg, refl}``). Test
  triplets are matched by file stem: every image of the mixtures subfolder needs
  an image of the same stem in each layer subfolder, of the same size. Key: the
  stem. No masks.

  Raises DataError (naming the path) when a folder is missing or holds no images,
  ``dirs`` and ``layer_names`` disagree in length, a test layer file is missing or
  a test triplet's images differ in size, or an image header is unreadable.
  """
  layer_names = check_layer_names(layer_names)
  blend_mode = check_blend_mode(blend_mode)
  if isinstance(dirs, str) or dirs is None:
    raise DataError(f"dirs must be a sequence of folder names, got {dirs!r}")
  dirs = tuple(os.fspath(d) for d in dirs)
  if len(dirs) != len(layer_names) + 1:
    raise DataError(
        f"dirs must name {len(layer_names) + 1} folders (the mixtures, then one per layer "
        f"of {layer_names}), got {len(dirs)}: {dirs}")
  root = os.path.abspath(os.fspath(manual_dir))
  _check_dir(root, "the folder holding the image folders")
  paths = [_resolve(root, d) for d in dirs]
  what = ["the mixtures"] + [f"the images of layer {n!r}" for n in layer_names]
  splits = []
  for path, description in zip(paths, what):
    _check_dir(path, f"a folder of {description}")
    folder = os.path.basename(path)
    files = list_images(path)
    _check_headers(files)
    splits.append(tuple((f"{folder}/{os.path.basename(f)}", f) for f in files))

  test: tuple[Triplet, ...] = ()
  if test_dir is not None:
    test_root = _resolve(root, test_dir)
    _check_dir(test_root, f"the test folder with subfolders "
               f"{', '.join(os.path.basename(p) for p in paths)}")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
      raise DataError(f"{test_root}: the test subfolders are named after the last "
                      f"component of dirs, which must then be distinct, got {names}")
    sub_dirs = [_check_dir(os.path.join(test_root, n), f"test images of {w}")
                for n, w in zip(names, what)]
    files = [_by_stem(d) for d in sub_dirs]
    triplets = []
    for stem, x_path in sorted(files[0].items()):
      layers = _match_layers(stem, x_path, sub_dirs[1:], files[1:])
      _check_same_size((x_path,) + layers, f"the test triplet {stem!r}")
      triplets.append(Triplet(key=stem, x=x_path, layers=layers, mask=None))
    test = tuple(triplets)
  return Layout(name="image_folders", layer_names=layer_names, blend_mode=blend_mode,
                train_x=splits[0], train_layers=tuple(splits[1:]), test=test)
