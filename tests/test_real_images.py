"""The real-image generator (VGG-19 + context decoder), the input pipeline of prepared
datasets (unpaired sampling, augmentation) and the real-image configs."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sils_jax.data import pipeline, sampling
from sils_jax.models import vgg
from sils_jax.models.separator import LayerSeparator
from sils_jax.training import config_checks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))


def _tiny_vgg(**kw):
  return LayerSeparator(generator="vgg", decoder_features=(8, 8, 8, 8), vgg_channel_divisor=16, **kw)


def test_vgg_generator_shapes_names_and_levels():
  model = _tiny_vgg(num_layers=3)
  x = jnp.linspace(0, 1, 2 * 32 * 48 * 3).reshape(2, 32, 48, 3)
  v = model.init(jax.random.key(0), x)
  assert set(v["params"]) == {"E0", "E1", "E2", "G0", "G1", "G2"}
  assert tuple(v["params"]["E0"]["vgg"]) == vgg.CONV_NAMES  # conv1_1 ... conv5_4, the original names
  assert v["params"]["E0"]["vgg"]["conv3_2"]["kernel"].shape == (3, 3, 16, 16)
  dec = v["params"]["G0"]
  assert [k for k in dec if k.startswith("context") and not k.endswith("norm")] == [f"context{i}" for i in range(6)]
  assert dec["out"]["kernel"].shape == (1, 1, 64, 3)  # 1x1 conv, 3 filters, after 64-filter context convs
  codes, layers = model.apply(v, x, train=True, method="separate")
  assert layers.shape == (2, 3, 32, 48, 3) and layers.dtype == jnp.float32
  # the levels: conv1_2 (full size), conv2_2 (1/2), conv3_2 (1/4), conv4_4 (1/8), conv5_4 (1/16)
  assert [c.shape[1:3] for c in codes[0]] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
  # streams have unshared parameters: different outputs
  assert float(jnp.abs(layers[:, 0] - layers[:, 1]).max()) > 0


def test_context_network_dilations_are_the_papers():
  dec = vgg.ContextDecoder(features=(4, 4, 4, 4))
  feats = [jnp.zeros((1, 64 // s, 64 // s, 4)) for s in (1, 2, 4, 8, 16)]
  v = dec.init(jax.random.key(1), feats, train=False)
  jaxpr = jax.make_jaxpr(lambda f: dec.apply(v, f, train=False))(feats)
  dilations = [tuple(e.params["rhs_dilation"]) for e in jaxpr.jaxpr.eqns
               if e.primitive.name == "conv_general_dilated" and tuple(e.params["rhs_dilation"]) != (1, 1)]
  assert dilations == [(d, d) for d in (2, 4, 8, 16, 32)]  # then the dilation-1 conv
  assert v["params"]["context5"]["kernel"].shape == (3, 3, 64, 64)
  assert v["params"]["out"]["kernel"].shape == (1, 1, 64, 3)


def test_vgg_input_size_must_be_a_multiple_of_16():
  model = _tiny_vgg()
  with pytest.raises(ValueError, match="multiples of 16"):
    model.init(jax.random.key(0), jnp.zeros((1, 40, 48, 3)))


def test_preprocessing_modes():
  x = jnp.full((1, 2, 2, 3), 0.5).at[..., 0].set(1.0)  # R = 1, G = B = 0.5
  caffe = vgg.preprocess(x, "caffe")
  np.testing.assert_allclose(caffe[0, 0, 0], [127.5 - 103.939, 127.5 - 116.779, 255.0 - 123.68], rtol=1e-6)
  torch_mode = vgg.preprocess(x, "torch")
  np.testing.assert_allclose(torch_mode[0, 0, 0], [(1 - .485) / .229, (.5 - .456) / .224, (.5 - .406) / .225],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="vgg_preprocess"):
    vgg.preprocess(x, "tf")


# --- augmentation and the record pipeline ---------------------------------------


def test_augment_scale_crop_flip():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
  same = pipeline.augment(image, 48, np.array([0.5, 0.0, 0.0, 0.9]))  # scale 1.0, top-left crop, no flip
  np.testing.assert_array_equal(same, image[:, :48])
  flipped = pipeline.augment(image, 48, np.array([0.5, 0.0, 0.0, 0.1]))
  np.testing.assert_array_equal(flipped, image[:, :48][:, ::-1])
  right = pipeline.augment(image, 48, np.array([0.5, 0.0, 0.999, 0.9]))
  np.testing.assert_array_equal(right, image[:, 16:])
  big = pipeline.augment(image, 32, np.array([1.0, 0.0, 0.0, 0.9]))  # 1.2x then a 32 crop
  assert big.shape == (32, 32, 3)
  # a crop larger than the scaled image: the scale is raised until it fits
  assert pipeline.augment(image, 56, np.array([0.0, 0.5, 0.5, 0.9])).shape == (56, 56, 3)


def test_augment_scales_within_the_papers_range():
  image = np.zeros((100, 100, 3), np.uint8)
  image[:, 50:] = 255  # a vertical edge at the centre
  for u0 in (0.0, 1.0):
    out = pipeline.augment(image, 60, np.array([u0, 0.0, 0.5, 0.9]))
    # the edge position in the crop depends on the scale: 0.8 -> 80 px wide image, 1.2 -> 120
    width = 80 if u0 == 0.0 else 120
    left = int(0.5 * (width - 60 + 1))
    edge = int(np.argmax(out[0, :, 0] > 127))
    assert abs(edge - (width // 2 - left)) <= 1


def _fake_sources(num_x=5, num_layer=(4, 6), num_test=3, size=(40, 56)):
  rng = np.random.default_rng(1)
  h, w = size

  def ex(i, layers=None, mask=None):
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "layers": layers if layers is not None else np.zeros((0, 0, 0, 3), np.uint8),
            "mask": mask if mask is not None else np.zeros((0, 0), np.uint8), "key": f"k{i}"}
  sources = {"train_x": [ex(i) for i in range(num_x)]}
  for k, n in enumerate(num_layer):
    sources[f"train_layer{k}"] = [ex(i) for i in range(n)]
  sources["test"] = [ex(i, layers=rng.integers(0, 256, (len(num_layer), h, w, 3), dtype=np.uint8),
                        mask=(rng.random((h, w)) > 0.5).astype(np.uint8)) for i in range(num_test)]
  return sources


def test_record_pipeline_is_unpaired_seeded_and_sharded():
  sources = _fake_sources()
  data = pipeline.RecordLayers(sources, num_layers=2, image_size=32, seed=3, augment=True)
  a, b = data.train_batch(4, 4), data.train_batch(4, 4)
  np.testing.assert_array_equal(a["x"], b["x"])  # a pure function of (seed, step)
  assert a["x"].shape == (4, 32, 32, 3) and a["layers"].shape == (4, 2, 32, 32, 3)
  assert a["x"].dtype == np.float32 and 0.0 <= a["x"].min() and a["x"].max() <= 1.0
  other = pipeline.RecordLayers(sources, num_layers=2, image_size=32, seed=4, augment=True)
  assert not np.array_equal(other.train_batch(4, 4)["x"], a["x"])
  # two shards of a batch are its two halves
  halves = [data.train_batch(4, 4, shard_index=s, num_shards=2) for s in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["layers"] for h in halves]), a["layers"])
  # every pool is shuffled on its own: one epoch of layer pool 1 (6 images) covers each once
  idx = sampling.example_indices(3, 2, np.arange(6), 6)
  np.testing.assert_array_equal(np.sort(idx), np.arange(6))
  assert not np.array_equal(sampling.example_indices(3, 1, np.arange(4), 4),
                            sampling.example_indices(3, 2, np.arange(4), 4))
  with pytest.raises(ValueError, match="supervised"):
    data.train_batch(0, 2, paired=True)


def test_record_pipeline_without_augmentation_is_a_centre_crop():
  sources = _fake_sources()
  data = pipeline.RecordLayers(sources, num_layers=2, image_size=40, seed=0, augment=False)
  batch = data.train_batch(0, 1)
  i = sampling.example_indices(0, 0, np.arange(1), 5)[0]
  np.testing.assert_array_equal(batch["x"][0], sources["train_x"][i]["image"][:, 8:48] / np.float32(255))


def test_record_pipeline_test_triplets():
  sources = _fake_sources()
  data = pipeline.RecordLayers(sources, num_layers=2, image_size=32, eval_size=32)
  t = data.test_arrays(2)
  assert t["x"].shape == (2, 32, 32, 3) and t["layers"].shape == (2, 2, 32, 32, 3)
  assert t["mask"].shape == (2, 32, 32) and set(np.unique(t["mask"])) <= {0.0, 1.0}
  assert list(t["key"]) == ["k0", "k1"]
  with pytest.raises(ValueError, match="count"):
    data.test_arrays(4)


def test_record_pipeline_names_missing_splits():
  sources = _fake_sources()
  del sources["train_layer1"]
  with pytest.raises(ValueError, match="train_layer1"):
    pipeline.RecordLayers(sources, num_layers=2, image_size=32, name="mine")


# --- configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mit_intrinsic", "sir2", "image_folders"])
def test_real_configs_hold_the_papers_settings(name):
  import importlib
  module = importlib.import_module(name)
  c = module.get_config()
  assert c.generator == "vgg" and c.disc_branches == 3 and c.augment
  assert tuple(c.scale_range) == (0.8, 1.2)
  assert c.image_size % 16 == 0
  with pytest.raises(config_checks.ConfigError, match="manual_dir"):
    config_checks.validate(c)  # nothing is downloaded: the user names the data
  c.manual_dir = "/data"
  config_checks.validate(c)
  tiny = module.get_config("tiny")
  tiny.manual_dir = "/data"
  config_checks.validate(tiny)
  with pytest.raises(ValueError, match="variant"):
    module.get_config("huge")


def test_real_config_errors_name_the_field():
  import image_folders
  c = image_folders.get_config()
  c.manual_dir = "/data"
  c.folders = ("mixtures", "background")
  with pytest.raises(config_checks.ConfigError, match="config.folders"):
    config_checks.validate(c)
  c = image_folders.get_config()
  c.manual_dir = "/data"
  c.image_size = 200
  with pytest.raises(config_checks.ConfigError, match="config.image_size.*16"):
    config_checks.validate(c)
  c.image_size = 224
  c.vgg_weights = "w.npz"
  c.vgg_channel_divisor = 4
  with pytest.raises(config_checks.ConfigError, match="vgg_channel_divisor"):
    config_checks.validate(c)


def test_pretrained_weights_initialise_every_encoder(tmp_path):
  from real_images import make_tiny
  import mit_intrinsic
  from sils_jax.models import vgg_weights
  from sils_jax.training.state import create_states, init_key, load_pretrained_encoders, resolve_vgg_preprocess
  rng = np.random.default_rng(0)
  weights = {name: {"kernel": rng.normal(0, 0.01, shape).astype(np.float32),
                    "bias": rng.normal(0, 0.01, shape[-1:]).astype(np.float32)}
             for name, shape in vgg_weights.kernel_shapes().items()}
  path = str(tmp_path / "vgg19.npz")
  vgg_weights.save_npz(path, weights, "caffe")
  c = make_tiny(mit_intrinsic.get_config())
  c.vgg_channel_divisor = 1  # VGG-19's own widths, as pretrained weights need
  c.vgg_weights = path
  c.manual_dir = "/data"
  config_checks.validate(c)
  assert resolve_vgg_preprocess(c) == "caffe"  # read from the converted file
  g, _ = create_states(c, init_key(0))
  loaded = load_pretrained_encoders(g, c)
  for k in range(2):
    for name in vgg.CONV_NAMES:
      np.testing.assert_array_equal(loaded.params[f"E{k}"]["vgg"][name]["kernel"], weights[name]["kernel"])
      np.testing.assert_array_equal(loaded.params[f"E{k}"]["vgg"][name]["bias"], weights[name]["bias"])
  for a, b in zip(jax.tree.leaves(g.params["G0"]), jax.tree.leaves(loaded.params["G0"])):
    np.testing.assert_array_equal(a, b)  # decoders keep their initialisation
  c.vgg_channel_divisor = 16  # a model of other widths: the error names the file and the layer
  small, _ = create_states(c, init_key(0))
  with pytest.raises(ValueError, match="vgg19.npz: conv1_1/bias"):
    load_pretrained_encoders(small, c)


def test_synthetic_shapes_builder_reads_like_the_renderer(tmp_path):
  """The stored synthetic dataset, read by the record pipeline, gives the on-the-fly
  renderer's batches (same sampling order) up to uint8 quantisation."""
  import synthetic
  from sils_jax.training.loop import make_dataset
  c = synthetic.get_config("quick")
  c.image_size, c.num_train, c.num_test = 32, 12, 4
  on_the_fly = make_dataset(c)
  c.dataset, c.data_dir = "synthetic_shapes", str(tmp_path)
  stored = make_dataset(c)
  assert isinstance(stored, pipeline.RecordLayers)
  for step in (0, 5):  # 5 x 3 examples: the second epoch, reshuffled
    a, b = on_the_fly.train_batch(step, 3), stored.train_batch(step, 3)
    np.testing.assert_allclose(b["x"], a["x"], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(b["layers"], a["layers"], atol=0.5 / 255 + 1e-6)
  np.testing.assert_allclose(stored.test_arrays(4)["layers"], on_the_fly.test_arrays(4)["layers"],
                             atol=0.5 / 255 + 1e-6)
