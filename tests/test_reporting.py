"""MetricsWriter: metrics.jsonl lines, TensorBoard events readable without TensorFlow, resume.

Event files are read back with TFRecord framing and tensorboardX's own Event proto.
"""

import json
import struct

import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from e2llm_jax.training import reporting


def metrics(loss):
  return {"loss": np.float32(loss), "recon_loss": loss + 1.0, "ift_loss": loss - 1.0,
          "lr": 1e-3, "bad_steps": np.int32(0)}


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def read_scalars(tensorboard_dir):
  """{tag: {step: value}} over every event file (TFRecord: u64 length, u32 crc, data, u32 crc)."""
  scalars = {}
  for event_file in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
    data = event_file.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_jsonl_tensorboard_and_config(tmp_path):
  config = ml_collections.ConfigDict({"optim": {"lr": 0.5}, "mesh": {"shape": (1, -1, 1)}})
  with reporting.MetricsWriter(tmp_path, total_steps=10, progress=False) as writer:
    writer.write_config(config)
    for step in (2, 4, 6):
      writer.write(step, metrics(float(step)), tokens=1000)
    writer.write_eval(6, {"passkey_accuracy": 0.75})

  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert [line["step"] for line in lines] == [2, 4, 6]
  for line in lines:
    assert {"step", "loss", "recon_loss", "ift_loss", "tokens_per_s"} <= set(line)
    assert line["tokens_per_s"] > 0
  assert lines[1]["loss"] == 4.0 and lines[1]["recon_loss"] == 5.0 and lines[1]["bad_steps"] == 0
  assert read_jsonl(tmp_path / "eval_metrics.jsonl")[0]["passkey_accuracy"] == 0.75
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "optim": {"lr": 0.5}, "mesh": {"shape": [1, -1, 1]}}

  scalars = read_scalars(tmp_path / "tensorboard")
  assert scalars["train/loss"] == {2: 2.0, 4: 4.0, 6: 6.0}
  assert scalars["train/ift_loss"][6] == 5.0
  assert scalars["eval/passkey_accuracy"] == {6: 0.75}


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
  with reporting.MetricsWriter(tmp_path, total_steps=10, progress=False) as writer:
    for step in range(1, 7):
      writer.write(step, metrics(float(step)), tokens=10)
    writer.write_eval(5, {"score": 1.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss"')  # a line torn by the crash

  # The run crashed after step 6; the newest checkpoint is step 4.
  with reporting.MetricsWriter(tmp_path, total_steps=10, start_step=4, progress=False) as writer:
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_jsonl(tmp_path / "eval_metrics.jsonl") == []
    for step in range(5, 7):
      writer.write(step, metrics(10.0 * step), tokens=10)
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
  assert lines[-1]["loss"] == 60.0


def test_required_metrics_and_non_finite_values(tmp_path):
  with reporting.MetricsWriter(tmp_path, total_steps=3, progress=False) as writer:
    with pytest.raises(ValueError, match="tokens_per_s"):
      writer.write(1, metrics(1.0))  # neither tokens nor tokens_per_s
    record = writer.write(1, {**metrics(float("nan")), "tokens_per_s": 5.0})
  assert record["loss"] is None  # valid JSON, not NaN
  assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] is None


def test_progress_bar_and_plain_lines(tmp_path, capsys):
  with reporting.MetricsWriter(tmp_path / "bar", total_steps=4, progress=True) as writer:
    writer.write(2, metrics(1.5), tokens=100)
  assert "2/4" in capsys.readouterr().err
  with reporting.MetricsWriter(tmp_path / "log", total_steps=4, progress=False) as writer:
    writer.write(2, metrics(1.5), tokens=100)
  err = capsys.readouterr().err
  assert "step 2/4" in err and "loss 1.5" in err and "eta" in err


def test_other_processes_write_nothing(tmp_path):
  with reporting.MetricsWriter(tmp_path / "run", total_steps=3, is_chief=False) as writer:
    writer.write_config({"a": 1})
    assert writer.write(1, metrics(1.0), tokens=10) == {}
    writer.write_eval(1, {"score": 1.0})
  assert not (tmp_path / "run").exists()
