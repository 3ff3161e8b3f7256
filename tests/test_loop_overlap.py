"""The loop reads a step's metrics only after dispatching the next step, except where it must wait.

Also that the compiled step's per-device memory is printed before step 1.
"""

import json

import jax

from e2llm_jax.training import loop, step as step_lib
from test_training import tiny_config


def test_metrics_read_after_next_dispatch_and_memory_printed(tmp_path, monkeypatch, capsys):
  events = []
  compile_step = step_lib.compile_with_memory_report

  def recording_compile(*args, **kwargs):
    compiled = compile_step(*args, **kwargs)

    def dispatch(state, frozen, batch):
      state, metrics = compiled(state, frozen, batch)
      events.append("dispatch")
      return state, metrics
    return dispatch

  device_get = jax.device_get

  def recording_get(tree):
    if isinstance(tree, dict) and "bad_steps" in tree:
      events.append("read")
    return device_get(tree)

  monkeypatch.setattr(step_lib, "compile_with_memory_report", recording_compile)
  monkeypatch.setattr(loop.jax, "device_get", recording_get)
  loop.train(tiny_config(**{"ckpt.every_steps": 2}), str(tmp_path))  # test_training's 4 steps
  # Steps 1 and 3 are read after the next dispatch; 2 (a checkpoint) and 4 (the last) at once.
  assert events == ["dispatch", "dispatch", "read", "read", "dispatch", "dispatch", "read", "read"]
  logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2, 3, 4]
  assert "train step memory per device (8 devices" in capsys.readouterr().err
