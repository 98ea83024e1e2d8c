"""Training: one real step, multi-device equivalence, main end to end, resume, config errors."""

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sils_jax.training import config_checks, loop
from sils_jax.training.devices import replicate, shard, unreplicate
from sils_jax.training.state import AXIS, create_states, init_key
from sils_jax.training.step import LossConfig, train_step
from tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_step(config):
  g, d = create_states(config, init_key(config.seed))
  step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS)
  batch = loop.make_dataset(config).train_batch(0, config.per_device_batch_size)
  g1, d1, m = step(replicate(g), replicate(d), shard(batch))
  return g, d, unreplicate(g1), unreplicate(d1), {k: float(v) for k, v in unreplicate(m).items()}


@pytest.mark.parametrize("num_layers", [2, 3])
def test_one_step_updates_generator_and_discriminator(num_layers):
  g0, d0, g1, d1, m = _one_step(tiny_config(num_layers))
  for k in ["ss", "ss_inter", "cc", "cc_x", "gan_g", "gan_d", "r1", "g_total", "d_total",
            "g_grad_norm", "d_grad_norm"] + [f"ss_intra_{i}" for i in range(num_layers)] + \
           [f"cc_{i}" for i in range(num_layers)] + [f"gan_g_{i}" for i in range(num_layers)]:
    assert np.isfinite(m[k]), k
  assert m["g_grad_norm"] > 0 and m["d_grad_norm"] > 0
  # D diagnostics: shares of logits on the right side of 0, per layer
  for k in range(num_layers):
    for kind in ("real", "fake", "real_image", "fake_image"):
      assert 0.0 <= m[f"d{k}_acc_{kind}"] <= 1.0
  assert int(g1.step) == 1 and int(d1.step) == 1
  changed = lambda a, b: any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(g0.params, g1.params) and changed(d0.params, d1.params)
  # every stream's encoder and decoder and every layer's discriminator learns
  for k in range(num_layers):
    assert changed(g0.params[f"E{k}"], g1.params[f"E{k}"]) and changed(g0.params[f"G{k}"], g1.params[f"G{k}"])
    assert changed(d0.params[f"d{k}"], d1.params[f"d{k}"])
  # eq. (9) wiring: the totals are the weighted sums of their terms
  c = tiny_config(num_layers)
  assert m["g_total"] == pytest.approx(c.w1 * m["ss"] + c.lambda0 * m["gan_g"] + c.w2 * m["cc"], rel=1e-5)
  assert m["d_total"] == pytest.approx(c.lambda0 * m["gan_d"] + c.gp_weight * m["r1"], rel=1e-5)


def test_remix_term_adds_its_weighted_loss_and_alone_leaves_d_untrained():
  # the paper's terms plus remix: g_total gains remix_weight * remix
  c = tiny_config()
  c.remix_weight = 2.0
  _, _, _, _, m = _one_step(c)
  assert np.isfinite(m["remix"]) and m["remix"] > 0
  assert m["g_total"] == pytest.approx(c.w1 * m["ss"] + c.lambda0 * m["gan_g"] + c.w2 * m["cc"]
                                       + 2.0 * m["remix"], rel=1e-5)
  # remix alone (λ0 = w1 = w2 = 0): one generator pass on the blended layer samples;
  # D is neither run nor trained, and no other term is reported
  c.lambda0, c.w1, c.w2 = 0.0, 0.0, 0.0
  c.synthetic_color = False
  g0, d0, g1, d1, m = _one_step(c)
  assert m["g_total"] == pytest.approx(2.0 * m["remix"], rel=1e-6) and m["g_grad_norm"] > 0
  assert not {"ss", "gan_g", "cc", "gan_d", "r1"} & set(m)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d0.params), jax.tree.leaves(d1.params)))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g0.params), jax.tree.leaves(g1.params)))


def test_batchnorm_syncs_over_devices_only_when_there_are_several():
  # On one device the sync is the identity, yet XLA runs each of its ~85 all-reduces
  # per step (8-10% of the CPU step at batch 1), so create_states leaves it out there.
  # With several devices it must stay: test_eight_devices_equal_one_device_with_eight_
  # times_the_batch fails when it is dropped.
  assert jax.device_count() == 1
  g, _ = create_states(tiny_config(), init_key(0))
  assert g.apply_fn.__self__.bn_axis_name is None


def test_r1_of_mean_patch_logits_is_the_sum_form_over_patch_count_squared():
  # gp_logits='mean' differentiates each image's mean patch logit: exactly the 'sum'
  # form's gradient over h*w, so R1 is (h*w)^2 smaller (one branch; 32x32 -> 2x2 patches)
  import dataclasses
  from sils_jax.training.step import discriminator_loss
  config = tiny_config()
  _, d = create_states(config, init_key(config.seed))
  batch = loop.make_dataset(config).train_batch(0, 2)
  real, fake = batch["layers"], batch["x"][:, None].repeat(2, 1) / 2
  cfg = LossConfig.from_config(config)
  assert cfg.gp_logits == "sum"
  (h, w) = d.apply_fn({"params": d.params}, real)[0][0].shape[1:3]
  _, m_sum = discriminator_loss(d.params, d.apply_fn, real, fake, cfg)
  _, m_mean = discriminator_loss(d.params, d.apply_fn, real, fake, dataclasses.replace(cfg, gp_logits="mean"))
  assert h * w == 4 and float(m_sum["r1"]) > 0
  assert float(m_mean["r1"]) == pytest.approx(float(m_sum["r1"]) / (h * w) ** 2, rel=1e-4)
  assert float(m_mean["gan_d"]) == float(m_sum["gan_d"])
  with pytest.raises(ValueError, match="gp_logits"):  # never silently one of the two
    discriminator_loss(d.params, d.apply_fn, real, fake, dataclasses.replace(cfg, gp_logits="max"))


@pytest.mark.parametrize("guard_backend", ["cpu", "gpu"])
def test_non_finite_step_leaves_both_states_exactly_as_they_were(guard_backend, monkeypatch):
  # the guard is a lax.cond on CPU and a select elsewhere: check both forms here on CPU
  import sils_jax.training.step as step_module
  monkeypatch.setattr(step_module.jax, "default_backend", lambda: guard_backend)
  config = tiny_config()
  g, d = create_states(config, init_key(config.seed))
  step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(config)), axis_name=AXIS)
  batch = loop.make_dataset(config).train_batch(0, config.per_device_batch_size)
  batch = dict(batch, x=np.full_like(batch["x"], np.inf))
  g1, d1, m = step(replicate(g), replicate(d), shard(batch))
  assert float(unreplicate(m)["finite"]) == 0.0
  for before, after in ((g, unreplicate(g1)), (d, unreplicate(d1))):
    assert int(after.step) == int(before.step)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.tree.leaves(g.batch_stats)[0], jax.tree.leaves(unreplicate(g1).batch_stats)[0])


def test_supervised_upper_bound_fits_the_paired_layers():
  c = tiny_config()
  c.objective = "supervised"
  g, d = create_states(c, init_key(c.seed))
  step = jax.pmap(functools.partial(train_step, cfg=LossConfig.from_config(c)), axis_name=AXIS)
  batch = shard(loop.make_dataset(c).train_batch(0, 1, paired=True))
  g, d = replicate(g), replicate(d)
  d0 = d
  losses = []
  for _ in range(5):  # the same batch: L1 to its ground truth must fall
    g, d, m = step(g, d, batch)
    losses.append(float(unreplicate(m)["l1"]))
  assert losses[-1] < losses[0]
  assert set(unreplicate(m)) == {"l1", "g_total", "g_grad_norm", "finite"}
  for a, b in zip(jax.tree.leaves(d0.params), jax.tree.leaves(d.params)):  # no discriminator
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_numbers_other_seed_differs():
  a = _one_step(tiny_config())
  b = _one_step(tiny_config())
  for x, y in zip(jax.tree.leaves(a[2].params), jax.tree.leaves(b[2].params)):
    np.testing.assert_array_equal(x, y)
  assert a[4] == b[4]
  c = tiny_config()
  c.seed = 1
  other = _one_step(c)
  assert other[4]["g_total"] != a[4]["g_total"]


def test_eight_devices_equal_one_device_with_eight_times_the_batch():
  """8 fake CPU devices x 1 image == 1 device x 8 images: gradients and BatchNorm
  statistics are averaged over devices. Tolerance: 1e-5 absolute on the generator's
  parameters and 3e-5 on the discriminators' (one Adam step moves a parameter by ~lr =
  1e-4, so a wrong gradient sign or a missing pmean shows up 3-10x above them) and 1e-5
  relative on the losses. Adam's first
  step (b1 = 0) divides each gradient by its own size, so an element whose eight
  per-image terms nearly cancel carries their rounding into the update: on an AVX-512
  CPU one discriminator weight differed by 1.17e-5 (0.12 lr) between the two sums."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice_check.py")],
                       capture_output=True, text=True, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["g_params"]["max_abs_diff"] < 1e-5, res
  assert res["d_params"]["max_abs_diff"] < 3e-5, res
  assert res["batch_stats"]["max_abs_diff"] < 1e-5 * max(1.0, res["batch_stats"]["max_abs_value"]), res
  assert res["metrics"]["max_abs_diff"] < 1e-5 * max(1.0, res["metrics"]["max_abs_value"]), res


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_main_end_to_end_then_resume(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  tiny = os.path.join(ROOT, "tests", "tiny_config.py")
  # the CLI, with --config.field overrides, on a config file that reuses configs/synthetic.py
  cmd = [sys.executable, "-m", "sils_jax.main", f"--config={tiny}", f"--workdir={workdir}",
         "--config.num_train_steps=2", "--config.learning_rate=0.0002",
         "--config.cpu_kernels=auto",  # the CPU default (the resume below runs 'off': same parameters)
         "--keep_freed_memory", "--huge_pages"]  # opt-in process settings
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 2/2" in out.stderr and "test MSE x100" in out.stderr
  # glibc set to keep freed memory before jax started its threads (sils_jax/cpu_kernels/memory.py)
  assert "Keeping freed memory between steps" in out.stderr and "already started" not in out.stderr
  # ... and after the first step (only then), the heap backed with huge pages where the kernel allows
  assert out.stderr.count("Backing the heap with huge pages: ") == 1
  assert "not kept" not in out.stderr
  assert os.path.exists(os.path.join(workdir, "samples", "separation_0000002.png"))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["learning_rate"] == 0.0002
  train = _read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
  assert [r["step"] for r in train] == [1, 2]
  assert [r["step"] for r in _read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))] == [0, 2]
  evals = _read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))
  assert set(evals[-1]) >= {"step", "mse100_square", "mse100_circle", "mse100_mean"}
  baselines = json.load(open(os.path.join(workdir, "baselines.json")))
  assert set(baselines["x_over_n"]) == {"square", "circle"}

  # same command, more steps: continues from the step-2 checkpoint, with an evaluation
  # and a checkpoint at step 4 between steps; the pmapped train step is lowered once
  # (pmap runs as a jit named '_fun'). A step whose inputs came back with other shardings
  # than `replicate` gives would compile it again (30-45 s at 128x128 on this CPU).
  config = tiny_config()
  config.num_train_steps = 5
  config.learning_rate = 0.0002
  with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
    result = loop.train_and_evaluate(config, workdir)
  lowered = [r.getMessage()[:60] for r in caplog.records if r.getMessage().startswith("Compiling jit(_fun)")]
  assert len(lowered) == 1, lowered
  assert result["step"] == 5
  assert [r["step"] for r in _read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))] == [1, 2, 3, 4, 5]
  assert [r["step"] for r in _read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))] == [0, 2, 4, 5]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "5"]

  # an architecture change cannot resume, and the error names the field
  config.encoder_features = (4, 8, 8, 8, 16)
  with pytest.raises(config_checks.ConfigError, match="config.encoder_features"):
    loop.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("field,value,match", [
    ("lambda_intra", (0.5,), "config.lambda_intra"),
    ("image_size", 40, "config.image_size"),
    ("gan_loss", "wgan", "config.gan_loss"),
    ("gp_logits", "max", "config.gp_logits"),
    ("blend_mode", "screen", "config.blend_mode"),
    ("shapes", ("square", "circle", "square"), "config.shapes"),
    ("ss_levels", (7,), "config.ss_levels"),
    ("layer_names", ("a", "a"), "config.layer_names"),
    ("cpu_kernels", "fast", "config.cpu_kernels"),
    ("objective", "paired", "config.objective"),
    ("remix_weight", -1.0, "config.remix_weight"),
    ("no_such_field", 1, "unknown fields"),
])
def test_bad_config_fields_raise_clear_errors(field, value, match):
  c = tiny_config()
  c[field] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.validate(c)


def test_cli_reports_config_errors_without_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "sils_jax.main", "--config=configs/synthetic.py:quick",
         f"--workdir={tmp_path}", "--config.image_size=40"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode != 0
  assert "config.image_size" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("variant", ["", "quick", "three_layers_quick"])
def test_ours_config_is_the_paper_config_with_remix_on_gray_layers(variant):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import ours
  import synthetic
  paper, mine = synthetic.get_config(variant), ours.get_config(variant)
  config_checks.validate(paper)
  config_checks.validate(mine)
  # the paper's method keeps its meaning: no remix, coloured layers, every eq. (9) term
  assert paper.remix_weight == 0.0 and paper.synthetic_color and paper.lambda0 == 5.0
  assert (mine.remix_weight, mine.synthetic_color, mine.lambda0, mine.w1, mine.w2) == (1.0, False, 0.0, 0.0, 0.0)
  assert mine.layer_names == paper.layer_names and mine.image_size == paper.image_size
  if variant.endswith("quick"):
    assert mine.num_train_steps == 6000
