"""Architecture checks of the models built with flax's own layers (their defaults):
shapes, parameter names, norms, output activations, BatchNorm under pmap,
discriminator branches. The CPU forms of the convs (``conv=``, ``conv_transpose=``
from sils_jax/cpu_kernels) are checked against these layers in test_cpu_kernels.py.

Random keys use the RBG generator, as the package does for initialisation: XLA:CPU
compiles threefry-based inits several times slower.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sils_jax.models.discriminator import Discriminator, LayerDiscriminators, downsample
from sils_jax.models.separator import LayerSeparator
from sils_jax.models.unet import Encoder


def test_encoder_levels_and_latent_shape():
  enc = Encoder(features=(16, 32, 64, 128, 256))
  x = jnp.zeros((2, 64, 64, 3))
  v = enc.init(jax.random.key(0, impl="rbg"), x, train=False)
  feats = enc.apply(v, x, train=False)
  assert [f.shape for f in feats] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128),
                                      (2, 2, 2, 256)]


@pytest.mark.parametrize("num_layers", [2, 3])
def test_separator_streams_are_unshared_and_callable_separately(num_layers):
  m = LayerSeparator(num_layers=num_layers, encoder_features=(4, 8, 8, 8, 8), decoder_features=(8, 8, 8, 4, 4))
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (2, 32, 32, 3))
  v = m.init(jax.random.key(1, impl="rbg"), x, train=False)
  assert sorted(v["params"]) == sorted([f"E{k}" for k in range(num_layers)] + [f"G{k}" for k in range(num_layers)])
  k0 = v["params"]["E0"]["conv0"]["kernel"]
  k1 = v["params"]["E1"]["conv0"]["kernel"]
  assert not np.allclose(k0, k1)  # same structure, separate parameters
  layers = m.apply(v, x)
  assert layers.shape == (2, num_layers, 32, 32, 3)
  codes = m.apply(v, x, train=False, method="encode")
  assert len(codes) == num_layers and codes[0][-1].shape == (2, 1, 1, 8)
  decoded = m.apply(v, codes, train=False, method="decode")
  np.testing.assert_allclose(decoded, layers, atol=1e-6)
  per_layer = m.apply(v, jnp.stack([x] * num_layers, axis=1), train=False, method="encode_layers")
  for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(codes)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batchnorm_in_training_normalises_each_batch():
  m = LayerSeparator(num_layers=2, encoder_features=(4, 4, 4, 4, 4), decoder_features=(4, 4, 4, 4, 4))
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (4, 32, 32, 3))
  v = m.init(jax.random.key(1, impl="rbg"), x, train=False)
  (codes, _), upd = m.apply(v, x, train=True, method="separate", mutable=["batch_stats"])
  assert "batch_stats" in upd
  # BN output (before leaky ReLU) has zero mean per channel; after leaky ReLU the
  # negative half shrinks, so the mean is >= 0 and the features are not constant.
  f = codes[0][0]
  assert f.std() > 0.1


def test_downsample_is_unit_avgpool_without_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  y = downsample(x)
  assert y.shape == (1, 2, 2, 1)
  # corner window covers rows/cols {0,1} only (padding not counted)
  assert float(y[0, 0, 0, 0]) == pytest.approx(np.mean([0, 1, 4, 5]))
  # interior window (rows 1..3, cols 1..3)
  assert float(y[0, 1, 1, 0]) == pytest.approx(np.mean([5, 6, 7, 9, 10, 11, 13, 14, 15]))


@pytest.mark.parametrize("branches", [1, 3])
def test_discriminator_branches(branches):
  d = LayerDiscriminators(num_layers=2, num_branches=branches)
  layers = jnp.zeros((2, 2, 64, 64, 3))
  v = d.init(jax.random.key(0, impl="rbg"), layers)
  out = d.apply(v, layers)
  assert len(out) == 2 and all(len(o) == branches for o in out)
  assert [o.shape for o in out[0]] == [(2, 4 // 2 ** b, 4 // 2 ** b, 1) for b in range(branches)]
  # the two layers' discriminators have separate parameters
  assert not np.allclose(v["params"]["d0"]["branch0_conv0"]["kernel"], v["params"]["d1"]["branch0_conv0"]["kernel"])
  with pytest.raises(ValueError, match="expected layers of shape"):
    d.apply(v, jnp.zeros((2, 3, 64, 64, 3)))


def test_discriminator_init_is_small_normal():
  v = Discriminator().init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
  k = np.asarray(v["params"]["branch0_conv1"]["kernel"])
  assert 0.015 < k.std() < 0.025  # N(0, 0.02), as UNIT


def test_models_default_to_flax_layers_with_their_parameter_layout():
  """The conv layers are module arguments whose defaults are flax's own; the parameter
  layout is flax's (HWIO kernels, the up-convs' (4, 4, Cin, F)), with a bias only where
  no normalisation follows."""
  from sils_jax.models.unet import Decoder
  from sils_jax.models.vgg import VGG19, ContextDecoder, VGGEncoder
  for module in (Encoder(), Decoder(), Discriminator(), LayerDiscriminators(), LayerSeparator(), VGG19(),
                 VGGEncoder(), ContextDecoder()):
    assert module.conv is nn.Conv, type(module).__name__
  assert Decoder().conv_transpose is nn.ConvTranspose and LayerSeparator().conv_transpose is nn.ConvTranspose
  m = LayerSeparator(num_layers=1, encoder_features=(4, 8, 8, 8, 8), decoder_features=(8, 8, 8, 4, 4))
  p = jax.eval_shape(lambda: m.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3))))["params"]
  shapes = jax.tree.map(lambda a: a.shape, p)
  assert shapes["E0"]["conv0"] == {"kernel": (4, 4, 3, 4)}  # BatchNorm follows: no bias
  assert shapes["G0"]["up0"] == {"kernel": (4, 4, 8, 8)}
  assert shapes["G0"]["up1"] == {"kernel": (4, 4, 16, 8)}  # the mirror link's channels
  assert shapes["G0"]["out"] == {"kernel": (3, 3, 4, 3), "bias": (3,)}


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_norms_and_output_activations(norm):
  m = LayerSeparator(num_layers=1, encoder_features=(4, 4, 4, 4, 4), decoder_features=(4, 4, 4, 4, 4), norm=norm,
                     output_activation="sigmoid")
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (2, 32, 32, 3))
  v = m.init(jax.random.key(1, impl="rbg"), x)
  enc = v["params"]["E0"]
  assert ("batch_stats" in v) == (norm == "batch")
  assert ("norm0" in enc) == (norm != "none")
  assert sorted(enc["conv0"]) == (["bias", "kernel"] if norm == "none" else ["kernel"])
  if norm != "none":
    assert sorted(enc["norm0"]) == ["bias", "scale"]
  out = m.apply(v, x)
  assert out.dtype == jnp.float32 and bool(jnp.all((out > 0) & (out < 1)))  # sigmoid
  raw = m.clone(output_activation="none").apply(v, x)
  np.testing.assert_allclose(out, jax.nn.sigmoid(raw), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="config.output_activation"):
    m.clone(output_activation="tanh").apply(v, x)


def test_bad_norm_and_generator_names_are_config_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="config.norm"):
    Encoder(features=(4,), norm="layer").init(jax.random.key(0, impl="rbg"), x, train=False)
  with pytest.raises(ValueError, match="config.generator"):
    LayerSeparator(generator="resnet").init(jax.random.key(0, impl="rbg"), x)


def test_batchnorm_under_pmap_syncs_over_the_axis_and_updates_the_statistics():
  """With ``bn_axis_name`` the batch statistics are averaged over the pmap axis (here
  one device: the same as without; several devices: test_train's eight-device check)."""
  enc = Encoder(features=(4, 4), bn_axis_name="batch")
  x = jax.random.uniform(jax.random.key(0, impl="rbg"), (1, 4, 16, 16, 3))
  v = enc.init(jax.random.key(1, impl="rbg"), x[0], train=False)
  f = lambda v, x, m: m.apply(v, x, train=True, mutable=["batch_stats"])
  feats, upd = jax.pmap(lambda v, x: f(v, x, enc), axis_name="batch")(jax.tree.map(lambda a: a[None], v), x)
  want, want_upd = f(v, x[0], enc.clone(bn_axis_name=None))
  for a, b in zip(jax.tree.leaves((feats, upd)), jax.tree.leaves((want, want_upd))):
    np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-5)
  assert not np.allclose(upd["batch_stats"]["norm0"]["mean"][0], v["batch_stats"]["norm0"]["mean"])
  with pytest.raises(NameError, match="batch"):  # the axis must be bound: never silently unsynced
    f(v, x[0], enc)
