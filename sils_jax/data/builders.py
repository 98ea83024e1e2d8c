"""tensorflow-datasets builders of the paper's data sets, built and read without TensorFlow.

One builder per data set: :class:`MitIntrinsic`, :class:`Sir2`,
:class:`ImageFolders` (the user's own task) and :class:`SyntheticShapes`. Each
stores ``array_record`` files (random access, read with
``builder.as_data_source()``); images are ``tfds.features.Tensor(uint8)``, which
needs no TensorFlow to encode or decode (``tfds.features.Image`` would).

Every example has the same features::

  image:  uint8 [H, W, 3]        the mixture x (train_x, test) or a layer image
  layers: uint8 [N, H, W, 3]     test only: the ground-truth layers of x,
                                 [0, 0, 0, 3] in the training splits
  mask:   uint8 [H, W] of 0 / 1  test only, where the data set has masks (MIT);
                                 [0, 0] otherwise
  key:    str                    where the example came from (unique in a split)

and every builder has the splits ``train_x`` (mixtures), ``train_layer0``,
``train_layer1``, ... (one per layer, unpaired with ``train_x``) and ``test``
(triplets; absent when the data set has none). See ``layouts.py`` for which
files go where (the paper's unpaired two-subset split).

Order: the builders set ``disable_shuffling=True`` and write every split sorted by
key, so example ``i`` of a split is the ``i``-th key in sorted order, the same on
every build and every host (tfds would otherwise order examples by a hash of
their key). Shuffling for training is the input pipeline's job.

Options and directories: a builder's options (for file data sets the absolute
``manual_dir`` and the subsets or folders; for synthetic data the render
arguments) are canonicalised to JSON and hashed; the builder config is named
``opt_<first 12 hex digits of the SHA-256>`` and the build lives in
``data_dir/<dataset>/opt_<hash>/1.0.0/``. The same options reuse an existing
build; different options (another split, another folder) build elsewhere.
Changing files inside ``manual_dir`` is not detected: delete the build (or use
another ``data_dir``) after editing the source files. The build's
``metadata.json`` (``builder.info.metadata``) records ``dataset``,
``layer_names``, ``blend_mode``, ``options``, ``num_examples`` per split,
``has_mask`` and, for MIT and SIR², the resolved ``subset1`` / ``subset2``.

Storage: ``image`` uses ``encoding='bytes'`` (raw pixels). ``layers`` and
``mask`` use ``encoding='zlib'``: tfds 4.9.10 cannot decode (numpy path) a
dynamically shaped bytes tensor whose byte string is shorter than its rank
(``shape[:len(value)]`` in ``Tensor._get_value_and_shape``), which is the case for
the empty ``[0, 0, 0, 3]`` / ``[0, 0]`` placeholders; zlib output is never that
short, and masks compress well.

Failures: :func:`prepare` scans and validates the source directory before writing
anything. If decoding fails while generating (a file whose header is fine but
whose pixel data is corrupt), the error is the :class:`DataError` naming the file.
tfds itself removes its ``incomplete.*`` temporary directory on an error but
leaves the empty ``<dataset>/<config>`` folders it created (and a
``downloads/extracted`` folder in ``data_dir``); :func:`prepare` gives tfds a
temporary download directory outside ``data_dir`` and, on any error, removes the
temporary directories and the empty folders that the failed build created, so
``data_dir`` is left as it was.

Nothing here imports TensorFlow (tfds imports it lazily, only when a TF feature
is used).
"""

from __future__ import annotations

import collections.abc
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from sils_jax.data import layouts
from sils_jax.data import synthetic
from sils_jax.data.image_io import DataError, read_mask, read_rgb

DATASETS = ("mit_intrinsic", "sir2", "image_folders", "synthetic_shapes")

_NO_LAYERS = np.zeros((0, 0, 0, 3), np.uint8)
_NO_MASK = np.zeros((0, 0), np.uint8)


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                    encoding="bytes"),
      "layers": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                     encoding="zlib"),
      "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
      "key": tfds.features.Text(),
  })


def _options_hash(options: dict) -> str:
  text = json.dumps(options, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _single(key: str, image: np.ndarray) -> tuple[str, dict]:
  """A training example: one image, no layers, no mask."""
  return key, {"image": image, "layers": _NO_LAYERS, "mask": _NO_MASK, "key": key}


def _triplet(key: str, x: np.ndarray, layers: Sequence[np.ndarray],
             mask: np.ndarray | None, where: str) -> tuple[str, dict]:
  stacked = np.stack(layers)
  if stacked.shape[1:] != x.shape or (mask is not None and mask.shape != x.shape[:2]):
    raise DataError(f"{where}: decoded images of the triplet {key!r} differ in size: x "
                    f"{x.shape}, layers {stacked.shape}, mask "
                    f"{None if mask is None else mask.shape}")
  return key, {"image": x, "layers": stacked,
               "mask": _NO_MASK if mask is None else mask, "key": key}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery: options -> config name, metadata, split dispatch.

  Subclasses set ``name``, ``TITLE`` and implement ``_layer_names``,
  ``_blend_mode``, ``_counts`` (validates; no writing) and ``_examples(split)``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: uint8 tensors, array_record, sorted keys."}
  TITLE = ""

  def _setup(self, data_dir, options: dict, init_kwargs: dict) -> None:
    self._init_kwargs = dict(init_kwargs)
    self._options = options
    self._layout_cache = None
    config = tfds.core.BuilderConfig(
        name=f"opt_{_options_hash(options)}",
        description=json.dumps(options, sort_keys=True))
    super().__init__(data_dir=os.fspath(data_dir) if data_dir else None, config=config,
                     file_format="array_record")

  # Pickling: rebuild from this class's own arguments (tfds pickles its base ones).
  def __getstate__(self):
    return {"_sils_init_kwargs": self._init_kwargs}

  def __setstate__(self, state):
    self.__init__(**state["_sils_init_kwargs"])

  @property
  def options(self) -> dict:
    """The canonical (JSON) options that define this build."""
    return json.loads(json.dumps(self._options))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.TITLE}\n\nLayers {list(self._layer_names())}, blend "
                     f"{self._blend_mode()}. Options: "
                     f"{json.dumps(self._options, sort_keys=True)}"),
        features=_features(),
        metadata=tfds.core.MetadataDict(
            dataset=self.name, layer_names=list(self._layer_names()),
            blend_mode=self._blend_mode(), options=self._options),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    counts = self._counts()
    self.info.metadata.update(self._extra_metadata())
    self.info.metadata["num_examples"] = dict(counts)
    return {split: self._generate_examples(split) for split in counts}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    yield from self._examples(split)

  def _extra_metadata(self) -> dict:
    return {"has_mask": False}

  def source_description(self) -> str:
    return self._options.get("manual_dir", "")

  # To implement.
  def _layer_names(self) -> tuple[str, ...]:
    raise NotImplementedError

  def _blend_mode(self) -> str:
    raise NotImplementedError

  def _counts(self) -> dict[str, int]:
    raise NotImplementedError

  def _examples(self, split: str) -> Iterator[tuple[str, dict]]:
    raise NotImplementedError


class _FileBuilder(_Builder, skip_registration=True):
  """A builder over a scanned :class:`layouts.Layout` of image files."""

  def _scan(self) -> layouts.Layout:
    raise NotImplementedError

  def layout(self) -> layouts.Layout:
    """Scans and validates the source directory (cached; writes nothing)."""
    if self._layout_cache is None:
      self._layout_cache = self._scan()
    return self._layout_cache

  def _counts(self) -> dict[str, int]:
    return self.layout().counts()

  def _extra_metadata(self) -> dict:
    layout = self.layout()
    return {"has_mask": any(t.mask is not None for t in layout.test),
            "subset1": list(layout.subset1), "subset2": list(layout.subset2)}

  def _examples(self, split: str) -> Iterator[tuple[str, dict]]:
    layout = self.layout()
    if split == "train_x":
      for key, path in layout.train_x:
        yield _single(key, read_rgb(path))
    elif split.startswith("train_layer"):
      for key, path in layout.train_layers[int(split[len("train_layer"):])]:
        yield _single(key, read_rgb(path))
    elif split == "test":
      for t in layout.test:
        yield _triplet(t.key, read_rgb(t.x), [read_rgb(p) for p in t.layers],
                       None if t.mask is None else read_mask(t.mask), t.x)
    else:
      raise ValueError(f"unknown split {split!r}")


def _subset_option(value, arg: str) -> list[str] | None:
  names = layouts.check_subset(value, arg)
  return None if names is None else sorted(names)


class _TwoSubsetBuilder(_FileBuilder, skip_registration=True):
  """A benchmark with a fixed layout, split into two disjoint subsets (paper Sec. 5.1):
  subclasses name the layers, the blend and the layout's scan function."""

  LAYER_NAMES: tuple[str, ...] = ()
  BLEND_MODE = ""
  SCAN = None  # layouts.scan_*(manual_dir, subset1, subset2)

  def __init__(self, *, data_dir, manual_dir, subset1: Sequence[str] | None = None,
               subset2: Sequence[str] | None = None):
    options = {"manual_dir": os.path.abspath(os.fspath(manual_dir)),
               "subset1": _subset_option(subset1, "subset1"),
               "subset2": _subset_option(subset2, "subset2")}
    self._setup(data_dir, options, dict(data_dir=data_dir, manual_dir=manual_dir,
                                        subset1=subset1, subset2=subset2))

  def _layer_names(self):
    return self.LAYER_NAMES

  def _blend_mode(self):
    return self.BLEND_MODE

  def _scan(self):
    o = self._options
    return type(self).SCAN(o["manual_dir"], o["subset1"], o["subset2"])


class MitIntrinsic(_TwoSubsetBuilder, skip_registration=True):
  """MIT Intrinsic Images, unpaired scene-disjoint split (see ``layouts.scan_mit_intrinsic``)."""

  name = "mit_intrinsic"
  TITLE = ("MIT Intrinsic Images (Grosse et al. 2009): x = albedo * shading, unpaired "
           "split over two disjoint object subsets (paper Sec. 5.1).")
  LAYER_NAMES = layouts.MIT_LAYER_NAMES
  BLEND_MODE = "multiplicative"
  SCAN = staticmethod(layouts.scan_mit_intrinsic)


class Sir2(_TwoSubsetBuilder, skip_registration=True):
  """SIR² reflection removal benchmark, unpaired split (see ``layouts.scan_sir2``)."""

  name = "sir2"
  TITLE = ("SIR² reflection removal benchmark (Wan et al. 2017): x = background + "
           "reflection, unpaired split over two disjoint key subsets (paper Sec. 5.1).")
  LAYER_NAMES = layouts.SIR2_LAYER_NAMES
  BLEND_MODE = "additive"
  SCAN = staticmethod(layouts.scan_sir2)


class ImageFolders(_FileBuilder, skip_registration=True):
  """The user's own task: folders of mixtures and layers (see
  ``layouts.scan_image_folders``)."""

  name = "image_folders"
  TITLE = "Image folders: unpaired mixtures and layers, optional test triplets."

  def __init__(self, *, data_dir, manual_dir, dirs: Sequence[str],
               layer_names: Sequence[str], blend_mode: str, test_dir: str | None = None):
    root = os.path.abspath(os.fspath(manual_dir))
    names = layouts.check_layer_names(layer_names)
    layouts.check_blend_mode(blend_mode)
    if isinstance(dirs, str) or dirs is None:
      raise DataError(f"dirs must be a sequence of folder names, got {dirs!r}")
    options = {
        "manual_dir": root,
        "dirs": [os.path.abspath(os.path.join(root, os.fspath(d))) for d in dirs],
        "layer_names": list(names),
        "blend_mode": blend_mode,
        "test_dir": (None if test_dir is None
                     else os.path.abspath(os.path.join(root, os.fspath(test_dir)))),
    }
    self._setup(data_dir, options, dict(data_dir=data_dir, manual_dir=manual_dir,
                                        dirs=dirs, layer_names=layer_names,
                                        blend_mode=blend_mode, test_dir=test_dir))

  def _layer_names(self):
    return tuple(self._options["layer_names"])

  def _blend_mode(self):
    return self._options["blend_mode"]

  def _scan(self):
    o = self._options
    return layouts.scan_image_folders(o["manual_dir"], o["dirs"], o["layer_names"],
                                      o["blend_mode"], o["test_dir"])


class SyntheticShapes(_Builder, skip_registration=True):
  """The repo's synthetic shape layers (``synthetic.py``), rendered once and stored.

  * ``train_x[i]``      = x of ``render_triplet(seed, 'train', 0, i)``;
  * ``train_layer{k}[i]`` = ``render_layer(seed, 'train', k + 1, i, k)`` (unpaired
    with ``train_x``: another domain, hence another draw);
  * ``test[i]``         = ``render_triplet(seed, 'test', 0, i)`` (x and layers);

  for ``i`` in ``range(num_train)`` / ``range(num_test)``, key ``"%06d" % i``.
  Layer names are the shape kinds, blend 'additive', no masks.

  Quantisation: the float renders in [0, 1] are stored as
  ``uint8(round(clip(v, 0, 1) * 255))``, an error of at most 0.5 / 255 ~ 0.002
  per value. x is quantised on its own, so the stored x and the sum of the
  stored layers of a test triplet differ by at most (N + 1) / 2 grey levels
  before rounding to integers, i.e. at most 1 level for N = 2 (the float
  renders satisfy ``x == sum(layers)`` exactly).
  """

  name = "synthetic_shapes"
  TITLE = ("Synthetic shape layers (paper Sec. 5.1: squares and circles, additive), "
           "rendered by sils_jax.data.synthetic and quantised to uint8.")

  def __init__(self, *, data_dir, image_size: int = 128,
               shapes: Sequence[str] = ("square", "circle"), num_train: int = 4000,
               num_test: int = 1000, seed: int = 0):
    data = synthetic.SyntheticLayers(image_size=image_size, shapes=shapes,
                                     num_train=num_train, num_test=num_test, seed=seed)
    self._data = data
    options = {"image_size": data.image_size, "shapes": list(data.shapes),
               "num_train": data.num_train, "num_test": data.num_test, "seed": data.seed}
    self._setup(data_dir, options, dict(data_dir=data_dir, image_size=image_size,
                                        shapes=shapes, num_train=num_train,
                                        num_test=num_test, seed=seed))

  def _layer_names(self):
    return tuple(self._options["shapes"])

  def _blend_mode(self):
    return "additive"

  def source_description(self) -> str:
    return f"sils_jax.data.synthetic {self._data!r}"

  def _counts(self):
    counts = {"train_x": self._data.num_train}
    for k in range(self._data.num_layers):
      counts[f"train_layer{k}"] = self._data.num_train
    counts["test"] = self._data.num_test
    return counts

  def _examples(self, split):
    d = self._data
    kwargs = dict(image_size=d.image_size, shapes=d.shapes)
    if split == "train_x":
      for i in range(d.num_train):
        x, _ = synthetic.render_triplet(d.seed, "train", 0, i, **kwargs)
        yield _single(f"{i:06d}", quantise(x))
    elif split.startswith("train_layer"):
      k = int(split[len("train_layer"):])
      for i in range(d.num_train):
        layer = synthetic.render_layer(d.seed, "train", k + 1, i, k, **kwargs)
        yield _single(f"{i:06d}", quantise(layer))
    elif split == "test":
      for i in range(d.num_test):
        x, layers = synthetic.render_triplet(d.seed, "test", 0, i, **kwargs)
        yield _triplet(f"{i:06d}", quantise(x), list(quantise(layers)), None, "synthetic")
    else:
      raise ValueError(f"unknown split {split!r}")


def quantise(values: np.ndarray) -> np.ndarray:
  """Floats in [0, 1] to uint8: ``round(clip(v, 0, 1) * 255)``."""
  return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


BUILDERS = {"mit_intrinsic": MitIntrinsic, "sir2": Sir2, "image_folders": ImageFolders,
            "synthetic_shapes": SyntheticShapes}


# ---------------------------------------------------------------------------
# Building without leaving half-written directories.


def _remove_failed_build(created: list[str], config_dir: str, before: set[str]) -> None:
  """Removes what a failed ``download_and_prepare`` left: new ``incomplete.*``
  entries in the config folder, then the folders it created, if empty."""
  if os.path.isdir(config_dir):
    for entry in set(os.listdir(config_dir)) - before:
      if entry.startswith("incomplete"):
        path = os.path.join(config_dir, entry)
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
  for path in created:  # deepest first
    try:
      os.rmdir(path)
    except OSError:
      pass  # not empty (another build) or already gone


def _build(builder: _Builder) -> None:
  version_dir = os.fspath(builder.data_dir)
  config_dir = os.path.dirname(version_dir)
  chain = [version_dir, config_dir, os.path.dirname(config_dir),
           os.fspath(builder.data_dir_root)]
  created = [p for p in chain if not os.path.exists(p)]
  before = set(os.listdir(config_dir)) if os.path.isdir(config_dir) else set()
  download_dir = tempfile.mkdtemp(prefix="sils_tfds_downloads_")
  try:
    builder.download_and_prepare(download_dir=download_dir, file_format="array_record")
  except BaseException:
    _remove_failed_build(created, config_dir, before)
    if builder.is_prepared():  # another process finished the same build meanwhile
      logging.warning("Build of %s failed here but %s is complete (built concurrently); "
                      "using it", builder.name, builder.data_dir)
      return
    raise
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)


def _check_stored_options(builder: _Builder) -> None:
  stored = _stored_metadata(builder).get("options")
  if stored is not None and stored != builder.options:
    raise DataError(f"{builder.data_dir}: existing build was made with options {stored}, "
                    f"expected {builder.options} (delete the folder to rebuild)")


def prepare(name: str, *, data_dir: str | None, **options) -> _Builder:
  """Scans, validates and builds data set ``name`` (one of ``DATASETS``) if needed.

  ``data_dir``: where builds live (None or '': tfds' default, ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``).

  ``options`` are the keyword arguments of the data set's builder class
  (``BUILDERS[name]``): ``manual_dir``, ``subset1``, ``subset2`` (MIT, SIR²);
  ``manual_dir``, ``dirs``, ``layer_names``, ``blend_mode``, ``test_dir`` (image
  folders); ``image_size``, ``shapes``, ``num_train``, ``num_test``, ``seed``
  (synthetic). An existing build with the same options is reused without looking
  at the source directory again. Returns the (prepared) builder.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
  builder = BUILDERS[name](data_dir=data_dir, **options)
  if builder.is_prepared():
    _check_stored_options(builder)
    logging.info("Reusing %s at %s (%s)", name, builder.data_dir,
                 _format_counts(_stored_metadata(builder).get("num_examples", {})))
    return builder
  counts = builder._counts()  # scans and validates: raises before anything is written
  logging.info("Building %s from %s into %s: %s", name, builder.source_description(),
               builder.data_dir, _format_counts(counts))
  start = time.time()
  _build(builder)
  logging.info("Built %s in %.1f s: %s", name, time.time() - start, builder.data_dir)
  return builder


def _format_counts(counts: dict) -> str:
  return ", ".join(f"{split} {n} examples" for split, n in counts.items())


# ---------------------------------------------------------------------------
# Reading.


class Examples(collections.abc.Sequence):
  """Random access to one split: ``source[i]`` is a dict of numpy values
  (``image``, ``layers``, ``mask``) and ``key`` as ``str``."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _convert(example: dict) -> dict:
    example = dict(example)
    key = example.get("key")
    if isinstance(key, (bytes, np.bytes_)):
      example["key"] = key.decode("utf-8")
    return example

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for a split of {n} examples")
    return self._convert(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    """Batched read (grain's protocol)."""
    n = len(self)
    indices = [int(i) + n if int(i) < 0 else int(i) for i in indices]
    return [self._convert(e) for e in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"Examples({len(self)} examples of {self._source!r})"


def data_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Examples]:
  """{split: random-access examples}, each split in sorted key order (see module doc).

  Splits in the order ``train_x``, ``train_layer0``, ..., ``test``.
  """
  if not builder.is_prepared():
    raise DataError(f"{builder.data_dir}: the dataset is not built yet; call prepare() "
                    f"first")
  sources = builder.as_data_source()
  names = sorted((str(s) for s in sources), key=_split_order)
  return {name: Examples(sources[name]) for name in names}


def _split_order(split: str) -> tuple:
  if split == "train_x":
    return (0, 0, split)
  if split.startswith("train_layer") and split[len("train_layer"):].isdigit():
    return (1, int(split[len("train_layer"):]), split)
  return (2, 0, split)


def _stored_metadata(builder: tfds.core.DatasetBuilder) -> dict:
  """The builder's metadata: ``info.metadata``, or the build's metadata.json
  (for builders read with ``tfds.builder_from_directory``)."""
  metadata = builder.info.metadata
  if metadata and "layer_names" in metadata:
    return dict(metadata)
  path = os.path.join(os.fspath(builder.data_dir), "metadata.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  raise DataError(f"{builder.data_dir}: no sils_jax metadata (layer_names, blend_mode); "
                  f"not a build of sils_jax.data.builders")


def builder_layer_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """The layer names, in the order of the ``train_layer{k}`` splits and of ``layers``."""
  return tuple(_stored_metadata(builder)["layer_names"])


def builder_blend_mode(builder: tfds.core.DatasetBuilder) -> str:
  """'additive' or 'multiplicative' (eq. (1) of the paper, ``sils_jax.blend``)."""
  return str(_stored_metadata(builder)["blend_mode"])
