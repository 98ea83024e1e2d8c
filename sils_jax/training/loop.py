"""The training loop: data -> pmapped step -> logs, evaluation, samples, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics

from sils_jax import blend, metrics
from sils_jax.data.prefetch import Prefetcher
from sils_jax.data.synthetic import SyntheticLayers
from sils_jax.image_grid import separation_grid
from sils_jax.training import checkpoints, config_checks
from sils_jax.training.devices import first_copy, replicate, shard, unreplicate
from sils_jax.training.state import (AXIS, create_states, init_key, learning_rate_fn, load_pretrained_encoders,
                                     make_generator, resolve_vgg_preprocess)
from sils_jax.training.step import LossConfig, predict, train_step
from sils_jax.training.writers import Progress, ProfileWindow, eta_str, make_writer


def make_dataset(config):
  """The run's data: synthetic shapes rendered on the fly, or a prepared TFDS dataset
  (built from config.manual_dir on first use) read by ``pipeline.RecordLayers``; both
  have the same interface and the same sampling order (``data/sampling.py``)."""
  if config.dataset == "synthetic":
    return SyntheticLayers(image_size=config.image_size, shapes=tuple(config.shapes),
                           num_train=config.num_train, num_test=config.num_test, seed=config.seed,
                           color=config.synthetic_color)
  from sils_jax.data import builders, pipeline
  options = dataset_options(config)
  data_dir = config.data_dir or os.path.expanduser("~/tensorflow_datasets")
  # process 0 builds; the others then read the finished build
  lead = jax.process_index() == 0
  if lead:
    builder = builders.prepare(config.dataset, data_dir=data_dir, **options)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sils_jax dataset prepared")
  if not lead:
    builder = builders.prepare(config.dataset, data_dir=data_dir, **options)
  names, mode = builders.builder_layer_names(builder), builders.builder_blend_mode(builder)
  if len(names) != len(config.layer_names):
    raise config_checks.ConfigError(
        f"config.layer_names: expected {len(names)} names for dataset {config.dataset} (its layers are "
        f"{names}), got {tuple(config.layer_names)}")
  if mode != config.blend_mode:
    raise config_checks.ConfigError(f"config.blend_mode: expected {mode!r} for dataset {config.dataset}, "
                                    f"got {config.blend_mode!r}")
  return pipeline.RecordLayers(
      builders.data_sources(builder), num_layers=len(names), image_size=config.image_size,
      seed=config.seed, augment=config.augment, scale_range=tuple(config.scale_range),
      base_size=config.base_size, eval_size=config.eval_image_size,
      name=config.dataset)


def dataset_options(config) -> dict:
  """The builder options of config.dataset (builders.prepare's keyword arguments)."""
  if config.dataset == "synthetic_shapes":
    return dict(image_size=config.image_size, shapes=tuple(config.shapes), num_train=config.num_train,
                num_test=config.num_test, seed=config.seed)
  manual_dir = os.path.expanduser(config.manual_dir)
  if config.dataset in ("mit_intrinsic", "sir2"):
    return dict(manual_dir=manual_dir, subset1=tuple(config.subset1) or None,
                subset2=tuple(config.subset2) or None)
  return dict(manual_dir=manual_dir, dirs=tuple(config.folders), layer_names=tuple(config.layer_names),
              blend_mode=config.blend_mode, test_dir=config.test_folder or None)


class Evaluator:
  """Test MSE per layer on the held-out ground-truth triplets, plus sample grids.

  A dataset without test triplets (image_folders without test_folder) gets no scores;
  its sample grids show training inputs and their separation."""

  def __init__(self, config, data):
    self.config = config
    self.names = tuple(config.layer_names)
    count = min(config.num_eval_images, data.num_test)
    model = make_generator(config, axis_name=None)
    self._predict = jax.jit(functools.partial(predict, model, norm_stats=config.eval_norm_stats))
    if count == 0:
      logging.warning("dataset %s has no test triplets: no test scores, sample grids show training inputs",
                      config.dataset)
      self.test = None
      self.sample_x = data.train_batch(0, config.num_sample_images)["x"]
      self.baselines = {}
      return
    self.test = data.test_arrays(count)
    self.baselines = {kind: {k: float(v) * 100 for k, v in per.items()}
                      for kind, per in metrics.trivial_baselines(
                          self.test["x"], self.test["layers"], self.names).items()}

  def predict(self, g_state, x: np.ndarray) -> np.ndarray:
    bs = self.config.eval_batch_size
    outs = [np.asarray(self._predict(g_state.params, g_state.batch_stats, x[i:i + bs]))
            for i in range(0, len(x), bs)]
    return np.clip(np.concatenate(outs), 0.0, 1.0)

  def evaluate(self, g_state) -> dict[str, float]:
    if self.test is None:
      return {}
    pred = self.predict(g_state, self.test["x"])
    per = metrics.per_layer_mse(pred, self.test["layers"], self.names)
    out = {f"mse100_{k}": float(v) * 100 for k, v in per.items()}
    out["mse100_mean"] = float(np.mean(list(out.values())))
    # diagnostics: the mean MSE under the best layer order, and each layer's share of
    # the other layers (0: clean, 0.25: x/2 for two layers)
    out["order_invariant_mse100"] = float(metrics.order_invariant_mse(pred, self.test["layers"])) * 100
    for name, value in zip(self.names, np.asarray(metrics.leakage(pred, self.test["layers"], self.test["x"]))):
      out[f"leak_{name}"] = float(value)
    return out

  def samples(self, g_state) -> np.ndarray:
    k = self.config.num_sample_images
    x = self.sample_x if self.test is None else self.test["x"][:k]
    pred = self.predict(g_state, x)
    true = np.zeros_like(pred) if self.test is None else self.test["layers"][:k]  # black: unknown
    recomposed = np.asarray(blend.compose(np.moveaxis(pred, 1, 0), self.config.blend_mode))
    return separation_grid(x, pred, true, recomposed)


def train_and_evaluate(config, workdir: str, *, return_states: bool = False,
                       after_first_step: Callable[[], None] | None = None):
  """Trains as the config says, writing into ``workdir``; returns the last evaluation
  (and, with return_states, also this process's final generator and discriminator states).
  ``after_first_step`` is called once, when this run's first step has finished (the
  CLI backs the heap with huge pages there: ``sils_jax/cpu_kernels/memory.py``, opt-in)."""
  config_checks.validate(config)
  if config.generator == "vgg" and config.vgg_preprocess == "auto":
    config.vgg_preprocess = resolve_vgg_preprocess(config)  # saved resolved: restores need no weights file
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  num_devices = jax.local_device_count()
  global_batch = config.per_device_batch_size * jax.device_count()
  logging.info("devices: %d local (%s), %d processes; global batch %d",
               num_devices, jax.devices()[0].platform, jax.process_count(), global_batch)

  data = make_dataset(config)
  g_state, d_state = create_states(config, init_key(config.seed))
  manager = checkpoints.make_manager(workdir, config)
  g_state, d_state, start_step = checkpoints.restore_latest(manager, g_state, d_state, config)
  if start_step:
    logging.info("resumed from the checkpoint at step %d", start_step)
  elif config.generator == "vgg":
    if config.vgg_weights:
      g_state = load_pretrained_encoders(g_state, config)
      logging.info("VGG-19 encoders initialised from %s (preprocessing %r)", config.vgg_weights,
                   config.vgg_preprocess)
    else:
      logging.warning("config.vgg_weights is empty: the VGG-19 encoders start from random weights "
                      "(the paper starts from ImageNet weights)")
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  cfg = LossConfig.from_config(config)
  p_step = jax.pmap(functools.partial(train_step, cfg=cfg), axis_name=AXIS, donate_argnums=(0, 1))
  g_rep, d_rep = replicate(g_state), replicate(d_state)
  del g_state, d_state
  evaluator = Evaluator(config, data)
  lr_fn = learning_rate_fn(config)
  if evaluator.test is not None:
    logging.info("baselines on %d test images, MSE x100: %s", len(evaluator.test["x"]),
                 json.dumps(evaluator.baselines))
  if lead and evaluator.test is not None:
    with open(os.path.join(workdir, "baselines.json"), "w") as f:
      json.dump(evaluator.baselines, f, indent=2)

  total = config.num_train_steps
  writer = make_writer(workdir, lead=lead, tensorboard=config.tensorboard)
  writer.write_hparams(config)
  last_eval: dict[str, Any] = {}

  def evaluate(step: int) -> dict[str, Any]:
    g_host = unreplicate(g_rep)
    result = {"step": step, **evaluator.evaluate(g_host)}
    if evaluator.test is not None:
      logging.info("eval step %d: test MSE x100 %s (x/N baseline %s)", step,
                   {k: round(v, 4) for k, v in result.items() if k.startswith("mse")},
                   {k: round(v, 4) for k, v in evaluator.baselines["x_over_n"].items()})
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "step"})
    writer.write_images(step, {"separation": evaluator.samples(g_host)})
    return result

  if start_step == 0:  # the untrained model, so the curve shows where training starts
    evaluate(0)
  progress = Progress(total, config.log_every_steps, global_batch=global_batch, start_step=start_step)
  profiler = ProfileWindow(workdir, config.profile_start_step, config.profile_steps)
  done = start_step
  interval = None
  pending = None  # (step, metrics) whose finite flag is not read yet
  supervised = config.objective == "supervised"
  if supervised:
    logging.warning("config.objective='supervised': training on paired triplets with an L1 loss "
                    "(the upper bound of the method, not the method)")
  def make_batch(step: int) -> dict:  # a pure function of the step: safe to make ahead
    return shard(data.train_batch(step, global_batch, shard_index=jax.process_index(),
                                  num_shards=jax.process_count(), paired=supervised))
  depth = config.prefetch_batches
  if depth < 0:  # auto: on a CPU backend the workers would take cores from the step itself
    depth = 0 if jax.default_backend() == "cpu" else 2
  inputs = Prefetcher(make_batch, start_step, total, depth=depth,
                      workers=config.input_workers or min(8, os.cpu_count() or 1))
  with _stop_on_sigterm() as preempted, _closing(manager), writer, profiler, inputs:
    for step in range(start_step, total):
      profiler(step)
      g_rep, d_rep, step_metrics = p_step(g_rep, d_rep, inputs.get(step))
      if after_first_step is not None and step == start_step:
        jax.block_until_ready(step_metrics)  # the step's memory is back in the heap
        after_first_step()
      done = step + 1
      is_last = done == total
      # interval averages of every term, accumulated on device in one jitted call
      # (no host sync per step); the copies on the devices are equal (pmean)
      # (on the first device's copies: single-device computations, never a collective)
      interval = _accumulate(interval, jax.tree.map(first_copy, step_metrics))
      rates = progress(done)
      eval_now = done % config.eval_every_steps == 0 or is_last
      # read once: a SIGTERM arriving later in this step is handled at the next one
      save_now = done % config.checkpoint_every_steps == 0 or is_last or preempted.is_set()
      # NaN guard, read one step late: the flag of step `done - 1` is read after step
      # `done` is queued, so the device never idles while the host waits (the guard
      # kept the states of a bad step unchanged). A step that is logged, evaluated or
      # saved is checked at once, so nothing non-finite is reported or saved.
      if pending is not None:
        _check_finite(*pending, manager)
      pending = (done, step_metrics)
      if rates is not None or eval_now or save_now:
        _check_finite(*pending, manager)
        pending = None
      if rates is not None:
        m = {k: float(v) for k, v in interval.compute().items()}
        interval = None
        m.update(rates, lr=float(lr_fn(done - 1)))
        terms = "  ".join(f"{k} {m[k]:.4f}" for k in ("g_total", "ss", "gan_g", "cc", "remix", "d_total", "l1")
                          if k in m)
        logging.info("step %d/%d  %.2f steps/s  eta %s  %s", done, total, rates["steps_per_s"],
                     eta_str(rates["eta_s"]), terms)
        writer.write_scalars(done, m)
      if eval_now:
        last_eval = evaluate(done)
      if save_now:
        checkpoints.save(manager, done, unreplicate(g_rep), unreplicate(d_rep), config)
      if save_now and preempted.is_set() and not is_last:
        logging.warning("SIGTERM: saved the checkpoint at step %d and stopped; rerun the same "
                        "command to continue", done)
        break
  if preempted.is_set():
    last_eval = {"step": done, "preempted": True}
  elif not last_eval:  # resumed at the end: evaluate what is there
    last_eval = {"step": total, **evaluator.evaluate(unreplicate(g_rep))}
  if return_states:
    return last_eval, unreplicate(g_rep), unreplicate(d_rep)
  return last_eval


def _check_finite(done: int, step_metrics, manager) -> None:
  """Raises FloatingPointError naming the step and the non-finite terms (one scalar read)."""
  if bool(np.asarray(first_copy(step_metrics["finite"]))[0]):
    return
  m = {k: float(v) for k, v in unreplicate(step_metrics).items()}
  bad = sorted(k for k, v in m.items() if not np.isfinite(v))
  saved = manager.latest_step()
  raise FloatingPointError(
      f"step {done}: non-finite {', '.join(bad)} ({', '.join(f'{k}={m[k]}' for k in bad)}); "
      "the step was not applied and training stopped. "
      + (f"The last checkpoint (step {saved}) is intact." if saved else "No checkpoint was written."))


@functools.lru_cache(maxsize=None)
def _collection_for(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
  return clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in names})


def metric_collection(step_metrics: dict) -> type[clu_metrics.Collection]:
  """A clu.metrics Collection averaging every scalar the train step returns."""
  return _collection_for(tuple(sorted(step_metrics)))


@jax.jit
def _merge(interval, step_metrics):
  return interval.merge(metric_collection(step_metrics).single_from_model_output(**step_metrics))


@jax.jit
def _first(step_metrics):
  return metric_collection(step_metrics).single_from_model_output(**step_metrics)


def _accumulate(interval, step_metrics):
  """Adds one step's metrics to the interval's clu.metrics Collection (None: start one)."""
  return _first(step_metrics) if interval is None else _merge(interval, step_metrics)


@contextlib.contextmanager
def _closing(manager):
  """Lets pending asynchronous saves (of good steps) finish, also on errors."""
  try:
    yield manager
  finally:
    manager.wait_until_finished()
    manager.close()


@contextlib.contextmanager
def _stop_on_sigterm():
  """Yields an event that SIGTERM (preemption) sets: the loop finishes its step, saves
  and returns. The previous handler is restored afterwards."""
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield event
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGTERM, previous)
