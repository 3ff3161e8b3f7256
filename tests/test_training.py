"""Training on fake CPU meshes: sharding, mesh-independent losses, resume, restore on other meshes.

Also: two processes with jax.distributed give the losses of one, and non-finite steps stop the run cleanly.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from e2llm_jax import checkpoint, errors, sharding, towers
from e2llm_jax.models import e2llm
from e2llm_jax.training import loop, state as state_lib, step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE_MIB = 1 << 20

# Data, FSDP and tensor parallel alone and mixed, against one device. Every test of this file runs
# train.steps = STEPS: the programs of a mesh compile once for all of them (the session's cache).
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]
STEPS = 4


def tiny_config(**overrides):
  config = tiny.get_config()
  config.train.steps = STEPS
  config.train.log_every = 1
  config.train.eval_examples = 0
  config.ckpt.async_save = False
  for dotted, value in overrides.items():
    section, _, key = dotted.rpartition(".")
    target = config
    for part in section.split(".") if section else []:
      target = target[part]
    target[key] = value
  return config


def losses(workdir) -> list[tuple[int, float, float, float]]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  nan_if_null = lambda v: float("nan") if v is None else v
  return [(r["step"], r["loss"], nan_if_null(r["ift_loss"]), nan_if_null(r["recon_loss"]))
          for r in map(json.loads, lines)]


def batch_for(config, setup, step):
  data = loop.make_data(config, setup.model)
  return loop._model_arrays(data.local_batch(step))


def test_tiny_trains_sharded_with_the_same_losses_on_every_mesh():
  runs = {}
  for shape in MESHES:
    config = tiny_config(**{"mesh.shape": shape})
    setup = state_lib.create_train_state(config, sharding.make_mesh(shape, config.mesh.axes))
    frozen_before = jax.tree.map(np.asarray, setup.frozen)
    trainable_before = jax.tree.map(np.asarray, setup.state["trainable"])
    if shape[1] * shape[2] > 1:  # parameters split over fsdp or tensor
      big = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
          (setup.frozen, setup.state)) if leaf.nbytes > ONE_MIB]
      assert big, "the tiny config must have parameters over 1 MiB for this test to mean anything"
      for path, leaf in big:
        assert not leaf.sharding.is_fully_replicated, (shape, jax.tree_util.keystr(path))

    data = loop.make_data(config, setup.model)
    batches = [loop._model_arrays(data.local_batch(step)) for step in range(STEPS)]
    train_step = step_lib.make_train_step(config, setup, batches[0])
    state, per_step = setup.state, []
    for batch in batches:
      state, metrics = train_step(state, setup.frozen, batch)
      metrics = jax.device_get(metrics)
      assert metrics["recon_tokens"] > 0 and metrics["ift_tokens"] > 0  # both tasks in the batch
      per_step.append([metrics["loss"], metrics["ift_loss"], metrics["recon_loss"]])
    runs[shape] = np.array(per_step)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, setup.frozen),
                 frozen_before)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["trainable"],
                           trainable_before)
    assert all(jax.tree.leaves(changed)), (shape, changed)
  reference = runs[(1, 1, 1)]
  assert np.all(np.isfinite(reference)) and np.all(reference > 0)
  for shape, values in runs.items():
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-6, err_msg=str(shape))


def test_resume_gives_identical_losses(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  config = tiny_config(**{"ckpt.every_steps": 2})
  loop.train(config, str(straight))
  loop.train(config, str(resumed), stop_after=3)  # dies after step 3; the newest checkpoint is 2
  loop.train(config, str(resumed))  # the same command again: resumes from step 2
  assert [s for s, *_ in losses(resumed)] == list(range(1, STEPS + 1))
  np.testing.assert_array_equal(np.array(losses(resumed)), np.array(losses(straight)))


def test_checkpoint_restores_on_other_meshes(tmp_path):
  workdir = tmp_path / "run"
  written = tiny_config(**{"mesh.shape": (2, 2, 2), "ckpt.every_steps": 2})
  loop.train(written, str(workdir), stop_after=3)  # the newest checkpoint is step 2
  next_losses = []
  for shape in [(2, 2, 2), (1, 8, 1), (1, 1, 1)]:
    config = tiny_config(**{"mesh.shape": shape})
    setup = state_lib.create_train_state(config, sharding.make_mesh(shape, config.mesh.axes))
    with checkpoint.Checkpointer(workdir / "checkpoints", 2, 2, False) as ckpt:
      step, data_state = loop.restore_latest(ckpt, setup)
    assert step == 2 and data_state == {"step": 2}
    leaf = jax.tree.leaves(setup.state["trainable"])[0]
    assert leaf.sharding.mesh.devices.shape == shape
    example = batch_for(config, setup, 2)
    _, metrics = step_lib.make_train_step(config, setup, example)(setup.state, setup.frozen,
                                                                  example)
    next_losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(next_losses, next_losses[0], rtol=1e-5)


def test_init_from_starts_a_new_stage_from_trained_params_at_other_shapes(tmp_path):
  first = tmp_path / "stage1"
  loop.train(tiny_config(**{"ckpt.every_steps": 2}), str(first), stop_after=3)  # newest: step 2
  with checkpoint.Checkpointer(first / "checkpoints", 2, 2, False) as ckpt:
    trained = jax.device_get(ckpt.restore_params(2, sharding.abstract_with_shardings(
        *_trainable_layout(tiny_config())))[0])
  config = tiny_config(**{"data.max_chunks": 6, "train.init_from": str(first)})
  setup = state_lib.create_train_state(config, sharding.make_mesh((1, 8, 1), config.mesh.axes))
  assert loop.init_trainable_from(str(first), setup) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(setup.state["trainable"]), trained)
  assert int(setup.state["step"]) == 0  # a new run: fresh step count and optimizer

  second = tmp_path / "stage2"
  loop.train(config, str(second))  # runs at the new shapes from stage 1's params
  assert [s for s, *_ in losses(second)] == list(range(1, STEPS + 1))
  with pytest.raises(errors.CheckpointError, match="holds no checkpoint"):
    loop.init_trainable_from(str(tmp_path / "empty"), setup)


def _trainable_layout(config):
  setup = state_lib.create_train_state(config, sharding.make_mesh((1, 8, 1), config.mesh.axes))
  return setup.state["trainable"], setup.state_shardings["trainable"]


def test_non_finite_steps_are_skipped_then_stop_with_checkpoint_intact(tmp_path):
  workdir = tmp_path / "run"
  loop.train(tiny_config(**{"ckpt.every_steps": 2}), str(workdir), stop_after=3)  # newest: step 2
  # Steps 3 and 4 are non-finite: skipped, and the second stops the run before it saves.
  config = tiny_config(**{"ckpt.every_steps": 2, "train.max_bad_steps": 2,
                          "loss.ift_weight": float("nan")})
  with pytest.raises(loop.NonFiniteLossError, match="Checkpoint step 2"):
    loop.train(config, str(workdir))
  with checkpoint.Checkpointer(workdir / "checkpoints", 2, 2, False) as ckpt:
    assert ckpt.latest_step() == 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_log_the_losses_and_held_out_scores_of_one(tmp_path):
  single = tmp_path / "single"
  single_eval = loop.train(tiny_config(**{"mesh.shape": (2, 2, 2), "train.eval_examples": 16}),
                           str(single))
  port = free_port()
  args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
          "--workdir", str(tmp_path / "multi"), "--config.mesh.shape=2,2,2",
          f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.train.eval_examples=16", "--config.ckpt.async_save=False"]
  procs = []
  for process_id in range(2):
    # The session's XLA flags (conftest.py), with 4 devices in each process.
    xla_flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    env = dict(os.environ, XLA_FLAGS=xla_flags,
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id), PYTHONPATH=str(ROOT))
    procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(np.array(losses(tmp_path / "multi")), np.array(losses(single)),
                             rtol=1e-5, atol=1e-6)
  # Held-out passkey scores are summed over both processes' rows, not one process's share.
  multi_eval = json.loads((tmp_path / "multi" / "eval_metrics.jsonl").read_text().splitlines()[-1])
  assert multi_eval["examples"] == single_eval["examples"] == 16
  assert multi_eval["exact_match"] == single_eval["exact_match"]
  np.testing.assert_allclose(multi_eval["ift_loss"], single_eval["ift_loss"], rtol=1e-5)


def test_bfloat16_run_stores_frozen_matmul_weights_in_bfloat16_with_the_same_losses(monkeypatch):
  config = tiny_config(**{"model.compute_dtype": "bfloat16", "mesh.shape": (1, 1, 1)})
  mesh = sharding.make_mesh((1, 1, 1), config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  dtypes = {jax.tree_util.keystr(path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(setup.frozen)}
  matmul = [k for k in dtypes if k.endswith("['kernel']") or "embed_tokens" in k]
  assert matmul and all(dtypes[k] == jax.numpy.bfloat16 for k in matmul), dtypes
  # Norms, and BERT's embeddings (summed before their cast), stay float32.
  kept = [k for k in dtypes if "norm" in k or "position_embeddings" in k]
  assert kept and all(dtypes[k] == jax.numpy.float32 for k in kept), dtypes

  monkeypatch.setattr(towers, "stored_dtypes", lambda cfg, abstract: abstract)
  float32_frozen = state_lib.create_train_state(config, mesh).frozen
  assert all(leaf.dtype == jax.numpy.float32 for leaf in jax.tree.leaves(float32_frozen))
  batch = batch_for(config, setup, 0)
  sums = jax.jit(lambda frozen: e2llm.loss_sums(setup.model, frozen, setup.state["trainable"],
                                                batch))
  jax.tree.map(np.testing.assert_array_equal, sums(setup.frozen), sums(float32_frozen))


def test_bfloat16_step_on_the_cpu_packs_its_residuals_without_changing_the_step(monkeypatch):
  """One bf16 train step as it runs (residuals carried as uint16, models/packing.py, and frozen
  kernels held packed, `e2llm.frozen_at_rest`, as the loop passes them), with the kernels packed
  by the step itself, and with packing turned off: the same loss, metrics and updated params."""
  from e2llm_jax.models import packing
  config = tiny_config(**{"model.compute_dtype": "bfloat16", "mesh.shape": (1, 1, 1)})
  mesh = sharding.make_mesh((1, 1, 1), config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  batch = batch_for(config, setup, 0)

  def one_step(frozen):
    state = jax.tree.map(jax.numpy.copy, setup.state)  # the step donates it
    return step_lib.make_train_step(config, setup, batch)(state, frozen, batch)

  at_rest = e2llm.frozen_at_rest(setup.frozen)
  assert isinstance(at_rest["decoder"]["layers"]["mlp"]["up_proj"]["kernel"], packing.Packed)
  runs = [one_step(at_rest), one_step(setup.frozen)]
  monkeypatch.setattr(packing, "pack", lambda tree: tree)
  monkeypatch.setattr(packing, "unpack", lambda tree: tree)
  state, metrics = one_step(setup.frozen)
  for packed_state, packed_metrics in runs:
    assert np.isfinite(float(packed_metrics["loss"]))
    for got, want in zip(jax.tree.leaves((packed_state, packed_metrics)),
                         jax.tree.leaves((state, metrics))):
      np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                 rtol=1e-5, atol=1e-7)
  jax.tree.map(np.testing.assert_array_equal, *runs)  # at rest or packed per step: the same bits


def test_step_encoding_in_groups_on_one_cpu_device_is_the_same_step(monkeypatch):
  """On one CPU device the train step encodes its chunks in groups (bert.groups_under_gradient):
  the same loss, metrics and updated params as encoding them as one batch."""
  from e2llm_jax.models import bert, packing
  config = tiny_config(**{"mesh.shape": (1, 1, 1)})
  mesh = sharding.make_mesh((1, 1, 1), config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  batch = batch_for(config, setup, 0)
  chunks = batch["chunk_ids"].shape[0] * batch["chunk_ids"].shape[1]
  chunk_tokens = batch["chunk_ids"].shape[2]
  monkeypatch.setattr(bert, "ENCODE_GROUP_TOKENS", 3 * chunk_tokens)  # groups of 3, and a rest
  loops = []
  grouped_loop = packing.over_groups
  monkeypatch.setattr(packing, "over_groups", lambda fn, group, *arrays, **kw: loops.append(
      (group, arrays[0].shape[0])) or grouped_loop(fn, group, *arrays, **kw))

  def one_step(grouped):
    monkeypatch.setattr(bert, "groups_under_gradient", lambda: grouped)
    state = jax.tree.map(jax.numpy.copy, setup.state)  # the step donates it
    return step_lib.make_train_step(config, setup, batch)(state, setup.frozen, batch)

  grouped_state, grouped_metrics = one_step(True)
  assert (3, chunks) in loops and chunks % 3, loops
  loops.clear()
  state, metrics = one_step(False)
  assert (3, chunks) not in loops, loops
  assert np.isfinite(float(metrics["loss"]))
  for got, want in zip(jax.tree.leaves((grouped_state, grouped_metrics)),
                       jax.tree.leaves((state, metrics))):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=1e-4, atol=1e-6)
