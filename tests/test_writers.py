"""Metric writers (JSON lines, PNG, hparams; TensorBoard event files through tensorboardX,
without TensorFlow), the progress reporter and the profiling window."""

import glob
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sils_jax.training import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f.read().splitlines()]


def _read_events(logdir):
  """Every ``Event`` of the event files in ``logdir``, parsed from the TFRecord framing
  (8-byte little-endian length, 4-byte masked crc32c of it, data, 4-byte crc of the data)
  with tensorboardX's own protobufs: no TensorFlow or tensorboard package needed."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event file in {logdir}: {os.listdir(logdir)}"
  events = []
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
      assert length_crc == masked_crc32c(header), f"{path}: bad length crc at {pos}"
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert len(body) == length and body_crc == masked_crc32c(body), f"{path}: bad record"
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + length
  return events


def _summary_values(events):
  """(step, Summary.Value) of every summary value, in file order."""
  return [(e.step, v) for e in events if e.HasField("summary") for v in e.summary.value]


# ---------------------------------------------------------------- scalars


def test_scalars_go_to_two_jsonl_files_with_exact_records(tmp_path):
  w = writers.make_writer(str(tmp_path), tensorboard="off")
  w.write_scalars(10, {"g_total": np.float32(0.5), "lr": 1e-4, "eval/mse100_square": 0.25,
                       "eval/mse100_mean": np.float64(0.375)})
  w.write_scalars(np.int64(20), {"g_total": np.array(0.25, np.float32), "d_total": 2})
  w.write_scalars(20, {"eval/mse100_mean": 0.125})
  w.close()
  train_text = (tmp_path / "train_metrics.jsonl").read_text()
  assert train_text == ('{"step": 10, "g_total": 0.5, "lr": 0.0001}\n'
                        '{"step": 20, "g_total": 0.25, "d_total": 2.0}\n')
  assert _lines(tmp_path / "eval_metrics.jsonl") == [
      {"step": 10, "mse100_square": 0.25, "mse100_mean": 0.375},
      {"step": 20, "mse100_mean": 0.125}]
  for r in _lines(tmp_path / "train_metrics.jsonl") + _lines(tmp_path / "eval_metrics.jsonl"):
    assert type(r["step"]) is int and all(type(v) is float for k, v in r.items() if k != "step")


def test_scalars_accept_jax_scalars_and_append_across_writers(tmp_path):
  import jax.numpy as jnp
  writers.FileWriter(str(tmp_path)).write_scalars(1, {"a": jnp.float32(1.5)})
  writers.FileWriter(str(tmp_path)).write_scalars(2, {"a": jnp.asarray(2.5), "step": 99})
  assert _lines(tmp_path / "train_metrics.jsonl") == [{"step": 1, "a": 1.5}, {"step": 2, "a": 2.5}]
  assert not (tmp_path / "eval_metrics.jsonl").exists()  # no eval/ key, no file


def test_scalar_that_is_not_a_number_raises(tmp_path):
  w = writers.FileWriter(str(tmp_path))
  with pytest.raises(ValueError, match="scalar 'loss'.*shape \\(2,\\)"):
    w.write_scalars(1, {"loss": np.zeros(2)})


def test_records_are_read_back_by_plots(tmp_path):
  from sils_jax import plots
  w = writers.FileWriter(str(tmp_path))
  w.write_scalars(2, {"g_total": 1.0})
  w.write_scalars(1, {"g_total": 2.0})
  assert plots.read_jsonl(str(tmp_path / plots.TRAIN_FILE)) == [
      {"step": 1, "g_total": 2.0}, {"step": 2, "g_total": 1.0}]


# ------------------------------------------------------------------ images


def test_images_are_exact_pngs(tmp_path):
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  f = rng.uniform(-0.2, 1.2, (1, 4, 6, 3)).astype(np.float32)
  w = writers.make_writer(str(tmp_path), tensorboard="off")
  w.write_images(300, {"grid": u8, "eval/pred": f})
  got_u8 = np.asarray(Image.open(tmp_path / "samples" / "grid_0000300.png"))
  got_f = np.asarray(Image.open(tmp_path / "samples" / "eval_pred_0000300.png"))
  np.testing.assert_array_equal(got_u8, u8)
  np.testing.assert_array_equal(got_f, (np.clip(f[0], 0, 1) * 255 + 0.5).astype(np.uint8))
  assert sorted(os.listdir(tmp_path / "samples")) == ["eval_pred_0000300.png", "grid_0000300.png"]


@pytest.mark.parametrize("image, match", [
    (np.zeros((4, 4), np.uint8), "HxWx3"),
    (np.zeros((2, 4, 4, 3), np.uint8), "HxWx3"),
    (np.zeros((4, 4, 4), np.float32), "HxWx3"),
    (np.zeros((4, 4, 3), np.int32), "dtype int32"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_raise(tmp_path, image, match):
  with pytest.raises(ValueError, match=f"image 'x'.*{match}"):
    writers.FileWriter(str(tmp_path)).write_images(1, {"x": image})
  assert not any(p.name.endswith(".png") for p in tmp_path.rglob("*"))


def test_hparams_json(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict({"lr": 1e-4, "betas": (0.0, 0.9), "shapes": ["square"],
                                   "n": np.int64(3), "nested": {"w": np.float32(0.5)}})
  writers.make_writer(str(tmp_path), tensorboard="off").write_hparams(cfg)
  assert json.loads((tmp_path / "hparams.json").read_text()) == {
      "lr": 1e-4, "betas": [0.0, 0.9], "shapes": ["square"], "n": 3, "nested": {"w": 0.5}}


def test_tensorboard_hparams_are_flattened_to_plain_values():
  flat = writers._flat_hparams({"a": {"b": np.float32(0.5), "c": True}, "t": (1, 2), "s": "x",
                                "n": None})
  assert flat == {"a.b": 0.5, "a.c": True, "t": "[1, 2]", "s": "x", "n": "null"}


# ----------------------------------------------------- lead / multi / modes


def test_non_lead_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = writers.make_writer(str(workdir), lead=False, tensorboard="on")  # "on" not checked either
  assert isinstance(w, writers.NullWriter)
  with w:
    w.write_scalars(1, {"a": 1.0, "eval/b": 2.0})
    w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    w.write_hparams({"a": 1})
    w.flush()
  assert not workdir.exists()


def test_multi_writer_forwards_every_call_in_order():
  calls = []

  class Recorder(writers.Writer):
    def __init__(self, tag):
      self.tag = tag

    def write_scalars(self, step, scalars):
      calls.append((self.tag, "scalars", step))

    def write_images(self, step, images):
      calls.append((self.tag, "images", step))

    def write_hparams(self, hparams):
      calls.append((self.tag, "hparams"))

    def flush(self):
      calls.append((self.tag, "flush"))

  with writers.MultiWriter([Recorder("a"), Recorder("b")]) as w:
    w.write_scalars(1, {})
    w.write_images(2, {})
    w.write_hparams({})
  assert calls == [("a", "scalars", 1), ("b", "scalars", 1), ("a", "images", 2),
                   ("b", "images", 2), ("a", "hparams"), ("b", "hparams"),
                   ("a", "flush"), ("b", "flush")]  # close() = flush() by default


def test_tensorboard_writer_passes_hwc_uint8_images_and_finite_floats(tmp_path, caplog):
  got = []

  class FakeSummaryWriter:
    def add_scalar(self, tag, value, global_step):
      got.append(("scalar", tag, value, global_step))

    def add_image(self, tag, image, global_step, dataformats):
      got.append(("image", tag, image, global_step, dataformats))

    def flush(self):
      got.append(("flush",))

    def close(self):
      got.append(("close",))

  tb = writers.TensorBoardWriter(str(tmp_path / "tb"))
  tb.summary_writer.close()
  tb.summary_writer = FakeSummaryWriter()
  with caplog.at_level(logging.WARNING, logger="absl"):
    tb.write_scalars(np.int32(3), {"a": np.float32(0.5), "eval/m": 2, "step": 3, "eval/step": 3,
                                   "bad": float("nan")})
    tb.write_scalars(4, {"bad": np.float32("inf")})
  assert got == [("scalar", "a", 0.5, 3), ("scalar", "eval/m", 2.0, 3)]
  assert all(type(g[2]) is float and type(g[3]) is int for g in got)
  assert sum("'bad'" in r.getMessage() for r in caplog.records) == 1  # one warning per tag
  with pytest.raises(ValueError, match="scalar 'v'"):
    tb.write_scalars(5, {"v": np.zeros(2)})
  got.clear()
  tb.write_images(3, {"x": np.ones((1, 4, 5, 3), np.float32)})
  (kind, tag, img, step, fmt), flush = got
  assert (kind, tag, step, fmt, flush) == ("image", "x", 3, "HWC", ("flush",))
  assert img.shape == (4, 5, 3) and img.dtype == np.uint8 and img.min() == 255
  got.clear()
  tb.write_images(4, {"gray": np.full((2, 3, 1), 9, np.uint8)})
  np.testing.assert_array_equal(got[0][2], np.full((2, 3, 3), 9, np.uint8))
  got.clear()
  with tb:
    pass
  assert got == [("close",)]


def test_auto_writes_tensorboard_events_that_read_back(tmp_path):
  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  with writers.make_writer(str(tmp_path), tensorboard="auto") as w:
    assert isinstance(w, writers.MultiWriter)
    assert [type(x) for x in w.writers] == [writers.FileWriter, writers.TensorBoardWriter]
    w.write_hparams({"lr": 1e-4, "nested": {"b": (1, 2)}, "name": "x"})
    w.write_scalars(7, {"g_total": np.float32(0.5), "eval/mse100_mean": 0.25, "nan": np.nan})
    w.write_scalars(9, {"g_total": 0.125})
    w.write_images(9, {"separation": grid, "float": np.zeros((1, 3, 4, 3), np.float32)})
  # the files are unchanged by the TensorBoard writer next to them
  assert _lines(tmp_path / "train_metrics.jsonl")[1:] == [{"step": 9, "g_total": 0.125}]
  assert _lines(tmp_path / "eval_metrics.jsonl") == [{"step": 7, "mse100_mean": 0.25}]
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "samples" / "separation_0000009.png")), grid)

  values = _summary_values(_read_events(str(tmp_path / "tensorboard")))
  scalars = [(step, v.tag, v.simple_value) for step, v in values if v.HasField("simple_value")]
  assert scalars == [(7, "g_total", 0.5), (7, "eval/mse100_mean", 0.25), (9, "g_total", 0.125)]
  images = {v.tag: (step, v.image) for step, v in values if v.HasField("image")}
  assert sorted(images) == ["float", "separation"]
  step, image = images["separation"]
  assert (step, image.height, image.width, image.colorspace) == (9, 6, 10, 3)
  assert images["float"][1].height == 3 and images["float"][1].width == 4
  import io
  np.testing.assert_array_equal(  # PNG-encoded, losslessly
      np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid)
  tags = {v.tag: v for _, v in values}
  assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(tags)
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  start = HParamsPluginData.FromString(
      tags["_hparams_/session_start_info"].metadata.plugin_data.content).session_start_info
  assert start.hparams["lr"].number_value == 1e-4
  assert start.hparams["nested.b"].string_value == "[1, 2]"
  assert start.hparams["name"].string_value == "x"
  text = tags["hparams/text_summary"].tensor.string_val[0].decode()
  assert '"lr": 0.0001' in text and '"name": "x"' in text


def test_bad_tensorboard_mode_raises(tmp_path):
  with pytest.raises(ValueError, match="tensorboard must be one of.*'yes'"):
    writers.make_writer(str(tmp_path), tensorboard="yes")


def test_tensorboard_on_without_tensorboardx_raises_clearly(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
  with pytest.raises(ImportError, match="config.tensorboard='on' needs tensorboardX.*"
                                        "config.tensorboard='auto' or 'off'"):
    writers.make_writer(str(tmp_path / "run"), tensorboard="on")
  assert not (tmp_path / "run").exists()  # nothing created before the error


def test_auto_without_tensorboardx_warns_once_and_writes_files(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with caplog.at_level(logging.INFO, logger="absl"):
    w = writers.make_writer(str(tmp_path), tensorboard="auto")
  assert isinstance(w, writers.FileWriter)
  msgs = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
  assert len(msgs) == 1 and msgs[0].levelno == logging.WARNING
  assert "tensorboardX" in msgs[0].getMessage()
  with w:
    w.write_scalars(3, {"a": 1.0, "eval/m": 0.5})
    w.write_images(3, {"grid": np.zeros((2, 2, 3), np.uint8)})
  assert _lines(tmp_path / "train_metrics.jsonl") == [{"step": 3, "a": 1.0}]
  assert _lines(tmp_path / "eval_metrics.jsonl") == [{"step": 3, "m": 0.5}]
  assert (tmp_path / "samples" / "grid_0000003.png").exists()
  assert not (tmp_path / "tensorboard").exists()


def test_off_writes_no_tensorboard(tmp_path):
  with writers.make_writer(str(tmp_path), tensorboard="off") as w:
    w.write_scalars(1, {"a": 1.0})
  assert not (tmp_path / "tensorboard").exists()


_NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    attempts = []

    class NoTensorFlow(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
          attempts.append(name)
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.modules.pop("tensorflow", None)
    sys.meta_path.insert(0, NoTensorFlow())
    import numpy as np
    from sils_jax.training import writers
    out = {"after_import": list(attempts),
           "heavy": sorted(m for m in ("jax", "clu.metric_writers", "clu.periodic_actions",
                                       "tensorboardX") if m in sys.modules)}
    w = writers.make_writer(sys.argv[1] + "/off", tensorboard="off")
    w.write_scalars(1, {"a": 1.0})
    out["after_off"] = list(attempts)
    out["tbx_after_off"] = "tensorboardX" in sys.modules
    w = writers.make_writer(sys.argv[1] + "/auto", tensorboard="auto")
    out["auto_type"] = type(w).__name__
    w.write_scalars(5, {"a": 0.5, "eval/m": 0.25})
    w.write_images(5, {"grid": np.full((3, 4, 3), 7, np.uint8)})
    w.write_hparams({"lr": 0.1})
    w.close()
    out["after_auto"] = list(attempts)
    out["clu_writers_loaded"] = "clu.metric_writers" in sys.modules
    out["tensorflow_loaded"] = any(m.split(".")[0] == "tensorflow" for m in sys.modules)
    print(json.dumps(out))
""")


def test_without_tensorflow_import_is_cheap_and_auto_writes_tensorboard(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.splitlines()[-1])
  assert out["after_import"] == [] and out["heavy"] == []
  assert out["after_off"] == [] and not out["tbx_after_off"]  # "off" imports neither
  assert out["after_auto"] == []  # tensorboardX never tries TensorFlow
  assert out["auto_type"] == "MultiWriter"
  assert not out["clu_writers_loaded"] and not out["tensorflow_loaded"]
  assert _lines(tmp_path / "off" / "train_metrics.jsonl") == [{"step": 1, "a": 1.0}]
  assert not (tmp_path / "off" / "tensorboard").exists()
  auto = tmp_path / "auto"
  assert _lines(auto / "train_metrics.jsonl") == [{"step": 5, "a": 0.5}]
  assert _lines(auto / "eval_metrics.jsonl") == [{"step": 5, "m": 0.25}]
  np.testing.assert_array_equal(np.asarray(Image.open(auto / "samples" / "grid_0000005.png")),
                                np.full((3, 4, 3), 7, np.uint8))
  assert json.loads((auto / "hparams.json").read_text()) == {"lr": 0.1}
  values = _summary_values(_read_events(str(auto / "tensorboard")))
  assert [(s, v.tag, v.simple_value) for s, v in values if v.HasField("simple_value")] == [
      (5, "a", 0.5), (5, "eval/m", 0.25)]
  assert [(v.tag, v.image.height, v.image.width) for _, v in values if v.HasField("image")] == [
      ("grid", 3, 4)]


# ----------------------------------------------------------------- progress


class _Clock:
  def __init__(self, t=100.0):
    self.t = t

  def __call__(self):
    return self.t


def test_progress_rates_on_a_fake_clock(monkeypatch, tmp_path):
  clock = _Clock()
  monkeypatch.setattr(writers.time, "monotonic", clock)
  w = writers.FileWriter(str(tmp_path))
  p = writers.Progress(num_train_steps=25, every_steps=10, writer=w, global_batch=8)
  clock.t += 5.0
  assert [p(s) for s in range(1, 10)] == [None] * 9
  r = p(10)  # 10 steps in 5 s
  assert r == {"steps_per_s": 2.0, "img_per_s": 16.0, "eta_s": 7.5, "elapsed_s": 5.0}
  clock.t += 2.5
  r = p(20)  # 10 steps in 2.5 s
  assert r == {"steps_per_s": 4.0, "img_per_s": 32.0, "eta_s": 1.25, "elapsed_s": 7.5}
  assert p(21) is None
  clock.t += 2.5
  r = p(25)  # the last step, off the period: 5 steps in 2.5 s
  assert r == {"steps_per_s": 2.0, "img_per_s": 16.0, "eta_s": 0.0, "elapsed_s": 10.0}
  assert p(25) is None  # nothing new since
  assert [rec["step"] for rec in _lines(tmp_path / "train_metrics.jsonl")] == [10, 20, 25]
  assert _lines(tmp_path / "train_metrics.jsonl")[0] == {"step": 10, **{
      "steps_per_s": 2.0, "img_per_s": 16.0, "eta_s": 7.5, "elapsed_s": 5.0}}


def test_progress_resumed_counts_from_start_step(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(writers.time, "monotonic", clock)
  p = writers.Progress(100, 50, start_step=40)
  clock.t += 2.0
  assert p(40) is None
  assert p(50)["steps_per_s"] == 5.0  # 10 steps (41..50) in 2 s


def test_progress_rejects_bad_arguments():
  with pytest.raises(ValueError, match="every_steps must be >= 1"):
    writers.Progress(10, 0)
  with pytest.raises(ValueError, match="num_train_steps must be >= 1"):
    writers.Progress(0, 1)


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00:00"), (59.4, "0:00:59"), (59.6, "0:01:00"), (3599, "0:59:59"), (3600, "1:00:00"),
    (3 * 3600 + 25 * 60 + 7, "3:25:07"), (100 * 3600 + 1, "100:00:01"), (-5, "0:00:00"),
    (float("inf"), "?"), (float("nan"), "?")])
def test_eta_str(seconds, text):
  assert writers.eta_str(seconds) == text


# ---------------------------------------------------------------- profiling


def test_profile_window_of_two_steps_writes_a_trace(tmp_path):
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((16, 16))
  f(x).block_until_ready()
  started = []
  with writers.profile_window(str(tmp_path), start_step=3, num_steps=2) as profile:
    for step in range(7):
      profile(step)
      started.append(profile.active)
      f(x).block_until_ready()
  assert started == [False, False, False, True, True, False, False]
  files = [os.path.join(r, n) for r, _, ns in os.walk(tmp_path / "profile") for n in ns]
  assert any(n.endswith(".xplane.pb") for n in files), files
  assert all(os.path.getsize(n) > 0 for n in files)


def test_profile_window_disabled_and_closed_early(tmp_path):
  with writers.profile_window(str(tmp_path / "off"), 0, 0) as profile:
    profile(0)
    assert not profile.active
  assert not (tmp_path / "off").exists()
  with pytest.raises(RuntimeError):  # a failing loop still stops the trace
    with writers.profile_window(str(tmp_path / "on"), 0, 100) as profile:
      profile(0)
      assert profile.active
      raise RuntimeError("step failed")
  assert not profile.active and (tmp_path / "on" / "profile").exists()


def test_profile_start_failure_logs_a_warning(tmp_path, monkeypatch, caplog):
  import jax

  def broken(logdir):
    raise RuntimeError("no profiler here")

  monkeypatch.setattr(jax.profiler, "start_trace", broken)
  window = writers.ProfileWindow(str(tmp_path), 0, 2)
  with caplog.at_level(logging.WARNING, logger="absl"):
    window(0)
    window(1)
  assert not window.active and window.done
  assert sum("no profiler here" in r.getMessage() for r in caplog.records) == 1
