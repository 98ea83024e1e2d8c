"""Tests for sils_jax.data.synthetic (the authors' toy shapes, Sec. 5.1 / 5.4)."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from sils_jax.data import synthetic
from sils_jax.data.synthetic import (SHAPES, SyntheticLayers, render_layer,
                                     render_triplet, save_examples_png, shape_mask)

TWO = ("square", "circle")
THREE = ("square", "circle", "triangle")


# ---------------------------------------------------------------------------
# An independent reference of the documented distribution (module docstring):
# the same random draws, rasterised with different formulas (meshgrid,
# hypot, barycentric coordinates).


def reference_triplet(seed, split_id, domain, index, size, shapes):
  rng = np.random.default_rng([seed, split_id, domain, index])
  n = len(shapes)
  colours = rng.integers(50, 220, size=(n, 3)) / 255.0
  u = rng.random((n, 4))
  weights = [rng.uniform(0.2, 0.8)] if n == 2 else [1.0 / n] * n
  if n == 2:
    weights.append(1.0 - weights[0])
  px, py = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)  # px[i, j] = j + .5
  layers = []
  for k, kind in enumerate(shapes):
    s = (0.1 + 0.5 * u[k, 0]) * size
    ax, ay = 0.6 * u[k, 1] * size, 0.6 * u[k, 2] * size
    theta = 2 * math.pi * u[k, 3]
    if kind == "square":
      inside = (px >= ax) & (px < ax + s) & (py >= ay) & (py < ay + s)
    elif kind == "circle":
      inside = np.hypot(px - ax, py - ay) <= s
    else:
      v = [(ax + s * math.cos(theta + 2 * math.pi * m / 3),
            ay + s * math.sin(theta + 2 * math.pi * m / 3)) for m in range(3)]
      (x1, y1), (x2, y2), (x3, y3) = v
      det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
      l1 = ((y2 - y3) * (px - x3) + (x3 - x2) * (py - y3)) / det
      l2 = ((y3 - y1) * (px - x3) + (x1 - x3) * (py - y3)) / det
      inside = (l1 >= 0) & (l2 >= 0) & (1 - l1 - l2 >= 0)
    layers.append(inside[..., None] * (weights[k] * colours[k]))
  return np.stack(layers), np.array(weights), colours


@pytest.mark.parametrize("shapes", [TWO, THREE, ("circle", "triangle")])
def test_matches_reference_distribution(shapes):
  for index in range(12):
    x, layers = render_triplet(3, "test", 0, index, image_size=48, shapes=shapes)
    ref, _, _ = reference_triplet(3, 1, 0, index, 48, shapes)
    assert x.dtype == np.float32 and layers.dtype == np.float32
    assert x.shape == (48, 48, 3) and layers.shape == (len(shapes), 48, 48, 3)
    # Masks agree (up to a pixel centre lying exactly on an edge) and values agree.
    differ = (layers > 0).any(-1) != (ref > 0).any(-1)
    assert differ.sum() <= 1
    np.testing.assert_allclose(layers[~differ], ref[~differ], atol=1e-6)


def test_determinism():
  a = render_triplet(0, "train", 1, 5, image_size=32)
  b = render_triplet(0, "train", 1, 5, image_size=32)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  for other in [render_triplet(1, "train", 1, 5, image_size=32),  # seed
                render_triplet(0, "test", 1, 5, image_size=32),  # split
                render_triplet(0, "train", 2, 5, image_size=32),  # domain
                render_triplet(0, "train", 1, 6, image_size=32)]:  # index
    assert not np.array_equal(a[1], other[1])
  d0 = SyntheticLayers(image_size=32, num_train=10, seed=0)
  d0b = SyntheticLayers(image_size=32, num_train=10, seed=0)
  d1 = SyntheticLayers(image_size=32, num_train=10, seed=1)
  b0, b0b, b1 = d0.train_batch(3, 4), d0b.train_batch(3, 4), d1.train_batch(3, 4)
  for key in ("x", "layers"):
    np.testing.assert_array_equal(b0[key], b0b[key])
    assert not np.array_equal(b0[key], b1[key])


@pytest.mark.parametrize("shapes", [TWO, THREE])
def test_range_and_additive_blend(shapes):
  for index in range(40):
    x, layers = render_triplet(0, "test", 0, index, image_size=32, shapes=shapes)
    assert 0.0 <= layers.min() and x.max() <= 1.0
    np.testing.assert_allclose(x, layers.sum(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shapes", [TWO, THREE, ("triangle", "circle", "square")])
def test_one_shape_per_layer_with_one_colour(shapes):
  n = len(shapes)
  for index in range(20):
    _, layers = render_triplet(7, "train", 0, index, image_size=64, shapes=shapes)
    _, weights, colours = reference_triplet(7, 0, 0, index, 64, shapes)
    for k, kind in enumerate(shapes):
      mask = (layers[k] > 0).any(-1)
      assert mask.any(), "the anchor lies in the image, so every shape is visible"
      values = layers[k][mask]
      np.testing.assert_allclose(values, np.broadcast_to(values[0], values.shape),
                                 atol=1e-7)
      assert (layers[k][~mask] == 0).all()
      # The colour is weight * randint[50, 220) / 255 for each channel.
      np.testing.assert_allclose(values[0], weights[k] * colours[k], rtol=1e-6)
      if n == 2:
        assert 0.2 <= weights[0] <= 0.8
      ints = colours[k] * 255
      assert ((ints >= 50) & (ints < 220)).all()
      rows, cols = np.nonzero(mask)
      if kind == "square":  # a (clipped) square is a filled axis-aligned rectangle
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()
      # The shape's rows are contiguous runs (convex shape, one component).
      for r in np.unique(rows):
        c = cols[rows == r]
        assert c.max() - c.min() + 1 == c.size


def test_three_layer_weights_are_one_third():
  data = SyntheticLayers(image_size=32, shapes=THREE, num_train=8, num_test=8)
  assert data.num_layers == 3
  t = data.test_arrays()
  assert t["layers"].shape == (8, 3, 32, 32, 3)
  for layers in t["layers"]:
    for k in range(3):
      value = layers[k][(layers[k] > 0).any(-1)][0]  # colour / 3
      ints = value.astype(np.float64) * 3 * 255
      np.testing.assert_allclose(ints, np.round(ints), atol=1e-3)
      assert ((np.round(ints) >= 50) & (np.round(ints) < 220)).all()
  batch = data.train_batch(0, 4)
  assert batch["x"].shape == (4, 32, 32, 3) and batch["layers"].shape == (4, 3, 32, 32, 3)


# ---------------------------------------------------------------------------
# Geometry.


def _moments(mask):
  rows, cols = np.nonzero(mask)
  x, y = cols + 0.5, rows + 0.5
  return x.mean(), y.mean(), x.var(), y.var(), np.mean((x - x.mean()) * (y - y.mean()))


@settings(max_examples=60, deadline=None)
@given(side=st.floats(20, 60), ax=st.floats(0, 60), ay=st.floats(0, 60))
def test_square_geometry(side, ax, ay):
  mask = shape_mask("square", side, ax, ay, 0.0, 128)
  # Centres in [a, a + s) number floor(s) or ceil(s) per axis.
  assert (side - 1) ** 2 <= mask.sum() <= (side + 1) ** 2
  cx, cy, vx, vy, cxy = _moments(mask)
  assert abs(cx - (ax + side / 2)) <= 0.5 and abs(cy - (ay + side / 2)) <= 0.5
  assert abs(cxy) < 1e-9


@settings(max_examples=60, deadline=None)
@given(r=st.floats(30, 50), ax=st.floats(50, 78), ay=st.floats(50, 78))
def test_circle_geometry(r, ax, ay):
  mask = shape_mask("circle", r, ax, ay, 0.0, 128)
  assert mask.sum() == pytest.approx(math.pi * r * r, rel=0.02)
  cx, cy, vx, vy, _ = _moments(mask)
  assert abs(cx - ax) < 0.25 and abs(cy - ay) < 0.25
  assert vx == pytest.approx(r * r / 4, rel=0.03) and vy == pytest.approx(r * r / 4, rel=0.03)


@settings(max_examples=60, deadline=None)
@given(r=st.floats(30, 50), ax=st.floats(50, 78), ay=st.floats(50, 78),
       angle=st.floats(0, 2 * math.pi))
@example(r=31.0, ax=50.0, ay=50.0, angle=0.0)  # edges through pixel centres: 3.3% cross moment
def test_triangle_geometry(r, ax, ay, angle):
  mask = shape_mask("triangle", r, ax, ay, angle, 128)
  assert mask.sum() == pytest.approx(3 * math.sqrt(3) / 4 * r * r, rel=0.03)
  # Equilateral: centroid at the anchor and an isotropic second moment R^2 / 8.
  cx, cy, vx, vy, cxy = _moments(mask)
  assert abs(cx - ax) < 0.5 and abs(cy - ay) < 0.5
  assert vx == pytest.approx(r * r / 8, rel=0.06) and vy == pytest.approx(r * r / 8, rel=0.06)
  # Rasterisation: where an edge runs exactly through pixel centres, the tie decides
  # a whole row of pixels on one side only (3.3% of R^2 / 8 at r = 31, angle 0).
  assert abs(cxy) < 0.05 * r * r / 8


def test_triangle_rotation_is_random():
  angles = []  # the documented draw order: colours (N, 3), then (N, 4) uniforms
  for index in range(200):
    rng = np.random.default_rng([0, 0, 0, index])
    rng.integers(50, 220, size=(3, 3))
    angles.append(2 * math.pi * rng.random((3, 4))[2, 3])
  hist, _ = np.histogram(np.mod(angles, 2 * math.pi / 3), bins=4, range=(0, 2 * math.pi / 3))
  assert hist.min() > 25  # roughly uniform over the triangle's symmetry period
  # Different rotations give different masks for the same size and centre.
  a = shape_mask("triangle", 20, 32, 32, 0.1, 64)
  b = shape_mask("triangle", 20, 32, 32, 0.7, 64)
  assert not np.array_equal(a, b)


def test_shapes_are_clipped_at_the_border():
  mask = shape_mask("square", 40.0, 50.0, 10.0, 0.0, 64)
  assert mask.shape == (64, 64)
  assert mask.sum() == (64 - 50) * 40
  mask = shape_mask("circle", 30.0, 60.0, 60.0, 0.0, 64)
  assert mask[63, 63] and mask.sum() < math.pi * 900 / 2


# ---------------------------------------------------------------------------
# Training batches (unpaired) and test batches (triplets).


def test_render_layer_matches_render_triplet():
  for shapes in (TWO, THREE):
    for k in range(len(shapes)):
      _, layers = render_triplet(2, "train", k + 1, 9, image_size=32, shapes=shapes)
      layer = render_layer(2, "train", k + 1, 9, k, image_size=32, shapes=shapes)
      np.testing.assert_array_equal(layer, layers[k])


@pytest.mark.parametrize("shapes", [TWO, THREE])
def test_train_batch_follows_the_definition(shapes):
  data = SyntheticLayers(image_size=32, shapes=shapes, num_train=5, seed=4)
  step, batch_size = 3, 4  # positions 12..15 straddle epochs 2 and 3
  batch = data.train_batch(step, batch_size)
  n = len(shapes)
  assert batch["x"].shape == (4, 32, 32, 3) and batch["layers"].shape == (4, n, 32, 32, 3)
  assert batch["x"].dtype == np.float32 and batch["layers"].dtype == np.float32
  for j in range(batch_size):
    p = step * batch_size + j
    for domain in range(n + 1):
      perm = np.random.default_rng([4, 7, domain, p // 5]).permutation(5)
      _, layers = render_triplet(4, "train", domain, perm[p % 5], image_size=32,
                                 shapes=shapes)
      if domain == 0:
        np.testing.assert_array_equal(batch["x"][j], layers.sum(0))
      else:
        np.testing.assert_array_equal(batch["layers"][j, domain - 1], layers[domain - 1])


def test_train_batches_are_unpaired_and_change_with_step():
  data = SyntheticLayers(image_size=32, num_train=50)
  b0, b1 = data.train_batch(0, 8), data.train_batch(1, 8)
  for batch in (b0, b1):
    for x, layers in zip(batch["x"], batch["layers"]):
      assert np.abs(x - layers.sum(0)).max() > 1e-3
    assert batch["x"].min() >= 0 and batch["x"].max() <= 1
  assert not np.array_equal(b0["x"], b1["x"])
  assert not np.array_equal(b0["layers"], b1["layers"])
  # Resuming at a step reproduces it.
  np.testing.assert_array_equal(SyntheticLayers(image_size=32, num_train=50)
                                .train_batch(1, 8)["layers"], b1["layers"])


def test_paired_train_batches_are_triplets_with_the_same_x():
  data = SyntheticLayers(image_size=32, num_train=50)
  unpaired, paired = data.train_batch(3, 4), data.train_batch(3, 4, paired=True)
  np.testing.assert_array_equal(paired["x"], unpaired["x"])  # the same inputs x either way
  np.testing.assert_allclose(paired["layers"].sum(1), paired["x"], atol=1e-6)  # additive blend


def test_epoch_permutations_cover_each_index_once():
  data = SyntheticLayers(image_size=16, num_train=13, seed=2)
  perms = {}
  for domain in range(3):
    for epoch in range(3):
      idx = data.train_indices(domain, np.arange(epoch * 13, (epoch + 1) * 13))
      np.testing.assert_array_equal(np.sort(idx), np.arange(13))
      perms[domain, epoch] = tuple(idx)
  assert len(set(perms.values())) == len(perms)  # own shuffle per domain and epoch
  # The same coverage through train_batch: 13 steps of 3 examples are 3 epochs.
  seen = [data.train_indices(1, s * 3 + np.arange(3)) for s in range(13)]
  seen = np.concatenate(seen)
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(seen[epoch * 13:(epoch + 1) * 13]), np.arange(13))


@pytest.mark.parametrize("num_shards", [2, 4])
def test_shards_concatenate_to_the_global_batch(num_shards):
  data = SyntheticLayers(image_size=16, shapes=THREE, num_train=7, seed=5)
  full = data.train_batch(2, 8)
  parts = [data.train_batch(2, 8, shard_index=s, num_shards=num_shards)
           for s in range(num_shards)]
  for key in ("x", "layers"):
    assert parts[0][key].shape[0] == 8 // num_shards
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_test_batches_are_ordered_triplets():
  data = SyntheticLayers(image_size=16, shapes=TWO, num_test=10, seed=1)
  batches = list(data.test_batches(4))
  assert [len(b["index"]) for b in batches] == [4, 4, 2]
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index, np.arange(10))
  full = data.test_arrays()
  assert set(full) == {"x", "layers", "index"}
  for key in ("x", "layers", "index"):
    np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), full[key])
  np.testing.assert_allclose(full["x"], full["layers"].sum(1), atol=1e-6, rtol=0)
  for i in range(10):
    x, layers = render_triplet(1, "test", 0, i, image_size=16, shapes=TWO)
    np.testing.assert_array_equal(full["x"][i], x)
    np.testing.assert_array_equal(full["layers"][i], layers)
  np.testing.assert_array_equal(data.test_arrays(3)["x"], full["x"][:3])


def test_test_split_differs_from_train_split():
  _, test_layers = render_triplet(0, "test", 0, 0, image_size=32)
  _, train_layers = render_triplet(0, "train", 0, 0, image_size=32)
  assert not np.array_equal(test_layers, train_layers)


# ---------------------------------------------------------------------------
# Errors.


def test_unknown_shape_raises():
  with pytest.raises(ValueError, match=r"'hexagon'.*square.*circle.*triangle"):
    SyntheticLayers(shapes=("square", "hexagon"))
  with pytest.raises(ValueError, match="hexagon"):
    render_triplet(0, "train", 0, 0, shapes=("hexagon", "circle"))
  with pytest.raises(ValueError, match="hexagon"):
    shape_mask("hexagon", 1.0, 0.0, 0.0, 0.0, 8)
  with pytest.raises(ValueError, match="sequence"):
    SyntheticLayers(shapes="square")
  with pytest.raises(ValueError, match="at least 2"):
    SyntheticLayers(shapes=("square",))


def test_bad_arguments_raise():
  data = SyntheticLayers(image_size=16, num_train=10, num_test=5)
  with pytest.raises(ValueError, match="not divisible"):
    data.train_batch(0, 6, num_shards=4)
  with pytest.raises(ValueError, match="shard_index"):
    data.train_batch(0, 8, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="split"):
    render_triplet(0, "valid", 0, 0)
  with pytest.raises(ValueError, match="count"):
    data.test_arrays(6)
  with pytest.raises(ValueError, match="image_size"):
    SyntheticLayers(image_size=0)


def test_all_shape_kinds_listed():
  assert SHAPES == ("square", "circle", "triangle")
  assert synthetic.SPLITS == {"train": 0, "test": 1}


# ---------------------------------------------------------------------------
# Figure and calibration.


def test_save_examples_png(tmp_path):
  from PIL import Image
  data = SyntheticLayers(image_size=16, shapes=THREE, num_train=10)
  path = save_examples_png(tmp_path / "grid.png", data, count=3)
  image = np.asarray(Image.open(path))
  pad = 2
  assert image.shape == (4 * 16 + 5 * pad, 3 * 16 + 4 * pad, 3)
  batch = data.train_batch(0, 3)
  np.testing.assert_array_equal(image[pad:pad + 16, pad:pad + 16],
                                np.round(batch["x"][0] * 255).astype(np.uint8))


def test_trivial_baseline_calibration():
  """STYLE.md: on this distribution, "each layer = x/2" scores MSE x 100 ~ 0.86.

  On 10k triplets this generator gives 0.844 +- 0.007; 300 triplets have a
  standard error of ~0.04.
  """
  from sils_jax import metrics
  data = SyntheticLayers(image_size=128, num_test=300)
  t = data.test_arrays()
  scores = metrics.trivial_baselines(t["x"], t["layers"], TWO)
  x_half = {k: 100 * float(v) for k, v in scores["x_over_n"].items()}
  assert x_half["square"] == pytest.approx(x_half["circle"], rel=1e-4)  # by symmetry
  assert 0.65 < x_half["square"] < 1.05


@pytest.mark.parametrize("shapes", [TWO, THREE])
def test_grayscale_layers_are_the_gray_of_the_colour_layers(shapes):
  """color=False (the authors' use_color off path): every layer is its colour layer's
  luma 0.299 R + 0.587 G + 0.114 B in all three channels, same shapes and weights;
  x is still their sum."""
  for index in range(10):
    x_c, layers_c = render_triplet(3, "test", 0, index, image_size=32, shapes=shapes)
    x_g, layers_g = render_triplet(3, "test", 0, index, image_size=32, shapes=shapes, color=False)
    luma = layers_c @ np.array([0.299, 0.587, 0.114], np.float32)
    for ch in range(3):
      np.testing.assert_allclose(layers_g[..., ch], luma, atol=2e-6)
    np.testing.assert_allclose(x_g, layers_g.sum(0), atol=1e-6)
    assert ((layers_g > 0) == (layers_c > 0).any(-1, keepdims=True)).all()
    np.testing.assert_array_equal(render_layer(3, "test", 0, index, 1, image_size=32, shapes=shapes,
                                               color=False), layers_g[1])


def test_grayscale_dataset_batches_and_baseline():
  gray = SyntheticLayers(image_size=32, num_train=8, num_test=4, color=False)
  batch = gray.train_batch(0, 2)
  for images in (batch["x"], batch["layers"], gray.test_arrays()["x"]):
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    np.testing.assert_array_equal(images[..., 1], images[..., 2])
  assert "color=False" in repr(gray)
  colour = SyntheticLayers(image_size=32, num_train=8, num_test=4).train_batch(0, 2)
  # the same draws: the same shapes where the colour images have them
  np.testing.assert_array_equal(batch["layers"][..., 0] > 0, (colour["layers"] > 0).any(-1))
