"""Checkpointer: restore onto other meshes, keep-N, atomic steps, base-weight fingerprints.

Runs on the 8 fake CPU devices from conftest.py; meshes are built here, not by e2llm_jax.sharding.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from e2llm_jax import checkpoint
from test_training import free_port

AXES = ("data", "fsdp", "tensor")


def make_mesh(shape):
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, AXES)


def spec_for(leaf):
  # Kernels split over (fsdp, tensor), long vectors over fsdp, the rest (scalars, the rng key)
  # replicated: every layout the real state uses, in a tree small enough to write in milliseconds.
  if leaf.ndim == 2:
    return P("fsdp", "tensor")
  if leaf.ndim == 1 and leaf.shape[0] % 8 == 0:
    return P("fsdp")
  return P()


def shardings(tree, mesh):
  return jax.tree.map(lambda leaf: NamedSharding(mesh, spec_for(leaf)), tree)


def train_state(mesh, seed=0):
  """A TrainState-shaped dict: trainable params + adamw state + step + rng + bad_steps."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  trainable = {"adapter": {"kernel": normal(16, 8), "bias": normal(8)}, "lora": {"a": normal(8, 4)}}
  adam, *rest = optax.adamw(1e-3).init(trainable)
  # Moments filled with random values: a restore of all-zero moments would prove little.
  adam = adam._replace(count=np.int32(5), mu=jax.tree.map(lambda x: normal(*x.shape), trainable),
                       nu=jax.tree.map(lambda x: normal(*x.shape) ** 2, trainable))
  state = {"step": np.int32(7), "trainable": trainable, "opt_state": (adam, *rest),
           "rng": rng.integers(0, 2**32, size=2, dtype=np.uint32), "bad_steps": np.int32(1)}
  # Built on the host and placed shard by shard: no jit compile, so the tests stay fast.
  return jax.device_put(state, shardings(state, mesh))


def abstract(tree, mesh):
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=NamedSharding(mesh, spec_for(leaf))), tree)


def assert_same_values(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def assert_target_shardings(restored, target):
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
    assert got.sharding.mesh.shape == want.sharding.mesh.shape


META = {"base_weights": {"encoder": {"path": None, "fingerprint": None}}}


@pytest.mark.parametrize("target_shape", [(2, 2, 2), (1, 1, 1)])
def test_restores_on_another_mesh_with_target_shardings(tmp_path, target_shape):
  source_mesh = make_mesh((1, 4, 2))
  state = train_state(source_mesh)
  frozen = {"encoder": {"kernel": jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4),
                                                 NamedSharding(source_mesh, P("fsdp", None)))}}
  data_state = {"step": 7, "seed": 3}
  config_json = {"optim": {"lr": 0.5}}
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    assert ckpt.save(7, state, data_state, config_json, META, frozen=frozen)

  target_mesh = make_mesh(target_shape)
  target = abstract(state, target_mesh)
  target_frozen = abstract(frozen, target_mesh)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    assert ckpt.latest_step() == 7
    restored, data, config, meta, restored_frozen = ckpt.restore(
        7, target, abstract_frozen=target_frozen)
  assert_same_values(restored, state)
  assert_target_shardings(restored, target)
  assert_same_values(restored_frozen, frozen)
  assert_target_shardings(restored_frozen, target_frozen)
  assert (data, config, meta) == (data_state, config_json, META)


def test_save_and_restore_under_set_mesh(tmp_path):
  # orbax #2545: saving under a global `jax.set_mesh` used to fail.
  mesh = make_mesh((2, 2, 2))
  with jax.set_mesh(mesh):
    state = train_state(mesh, seed=4)
    with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
      ckpt.save(3, state, {}, {}, META)
      ckpt.wait()
      restored, *_, frozen = ckpt.restore(3, abstract(state, mesh))
      assert not ckpt.has_frozen(3)
      with pytest.raises(ValueError, match="holds no base weights"):
        ckpt.restore(3, abstract(state, mesh), abstract_frozen=abstract(state["trainable"], mesh))
  assert_same_values(restored, state)
  assert frozen is None


def test_keeps_newest_and_saves_on_schedule(tmp_path):
  mesh = make_mesh((1, 8, 1))
  state = train_state(mesh)
  with checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2) as ckpt:
    started = [ckpt.save(step, state, {"step": step}, {}, META) for step in range(1, 8)]
    assert ckpt.save(7, state, {"step": 7}, {}, META, force=True)  # the final step, off-schedule
    assert not ckpt.save(7, state, {}, {}, META, force=True)  # already saved: no error, no-op
    ckpt.wait()
    assert started == [False, True, False, True, False, True, False]
    assert ckpt.all_steps() == [6, 7]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]
  with checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2) as ckpt:
    _, data, *_ = ckpt.restore(6, abstract(state, mesh))
  assert data == {"step": 6}


def test_unfinished_step_is_never_latest(tmp_path):
  mesh = make_mesh((1, 8, 1))
  state = train_state(mesh)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    ckpt.save(2, state, {}, {}, META)
  # What a host killed mid-save leaves behind: Orbax's temporary folder, never renamed.
  (tmp_path / "9.orbax-checkpoint-tmp-1234").mkdir()
  (tmp_path / "9.orbax-checkpoint-tmp-1234" / "state").mkdir()
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    assert ckpt.latest_step() == 2


def test_restore_requires_target_shardings(tmp_path):
  mesh = make_mesh((1, 8, 1))
  state = train_state(mesh)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    ckpt.save(1, state, {}, {}, META)
    ckpt.wait()
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match="no target sharding"):
      ckpt.restore(1, bare)


def test_changed_state_layout_gives_clear_error(tmp_path):
  mesh = make_mesh((1, 8, 1))
  state = train_state(mesh)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
    ckpt.save(1, state, {}, {}, META)
    ckpt.wait()
    target = abstract(state, mesh)
    # A LoRA rank changed between runs: (8, 4) on disk, (8, 2) wanted.
    changed = jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=NamedSharding(mesh, P()))
    target["trainable"]["lora"]["a"] = changed
    with pytest.raises(ValueError, match="does not fit the current train state") as error:
      ckpt.restore(1, target)
    assert "trainable.lora.a is (8, 4) on disk but (8, 2) now" in str(error.value)
    del target["trainable"]["adapter"]["bias"]
    with pytest.raises(ValueError, match="adapter.bias is in the checkpoint but not in the"):
      ckpt.restore(1, target)


def write_weights(folder: pathlib.Path, payload: bytes) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text('{"hidden_size": 8}')
  (folder / "model.safetensors").write_bytes(payload)
  (folder / "README.md").write_text("not a weight file")
  return folder


def test_fingerprint_sees_weights_not_location(tmp_path):
  big = os.urandom(3 << 20)  # larger than two 1 MiB edges, so head and tail are sampled
  original = checkpoint.fingerprint(write_weights(tmp_path / "a", big))
  assert original.startswith("sha256:")
  assert checkpoint.fingerprint(write_weights(tmp_path / "moved", big)) == original
  (tmp_path / "moved" / "README.md").write_text("edited docs")
  assert checkpoint.fingerprint(tmp_path / "moved") == original
  tail_changed = big[:-1] + bytes([big[-1] ^ 1])
  assert checkpoint.fingerprint(write_weights(tmp_path / "b", tail_changed)) != original
  head_changed = bytes([big[0] ^ 1]) + big[1:]
  assert checkpoint.fingerprint(write_weights(tmp_path / "c", head_changed)) != original
  gguf = tmp_path / "model.gguf"
  gguf.write_bytes(b"GGUF" + big[:100])
  assert checkpoint.fingerprint(gguf) != original
  with pytest.raises(FileNotFoundError, match="not found"):
    checkpoint.fingerprint(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No weight files"):
    checkpoint.fingerprint(tmp_path / "empty")


def test_fingerprint_mismatch_names_tower_paths_and_fix(tmp_path):
  encoder = write_weights(tmp_path / "gte", b"encoder weights")
  decoder = write_weights(tmp_path / "llama", b"decoder weights")
  other = write_weights(tmp_path / "other-llama", b"different decoder weights")
  saved = checkpoint.base_weights_meta({"encoder": encoder, "decoder": decoder})
  moved = write_weights(tmp_path / "moved-llama", b"decoder weights")

  checkpoint.check_fingerprints(saved, saved)
  checkpoint.check_fingerprints(
      saved, checkpoint.base_weights_meta({"encoder": encoder, "decoder": moved}))
  with pytest.raises(ValueError) as error:
    checkpoint.check_fingerprints(
        saved, checkpoint.base_weights_meta({"encoder": encoder, "decoder": other}))
  message = str(error.value)
  assert "decoder" in message and "encoder:" not in message
  assert str(decoder) in message and str(other) in message
  assert "model.<tower>.path back at the original weights" in message
  assert "new workdir" in message

  random_init = checkpoint.base_weights_meta({"encoder": None, "decoder": None})
  with pytest.raises(ValueError, match="random init"):
    checkpoint.check_fingerprints(random_init, saved)
  checkpoint.check_fingerprints(random_init, random_init)


TWO_PROCESS_WORKER = r"""
import sys
import numpy as np
from e2llm_jax import checkpoint, config_utils, launch

assert launch.maybe_initialize_distributed(config_utils.base_config())
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

directory, = sys.argv[1:]
full = np.arange(64, dtype=np.float32).reshape(8, 8)

def place(mesh, spec):
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index]), sharding

save_mesh = jax.make_mesh((1, 4, 1), ("data", "fsdp", "tensor"))
kernel, _ = place(save_mesh, P("fsdp", None))
with checkpoint.Checkpointer(directory, every_steps=1, keep=1) as ckpt:
  ckpt.save(1, {"trainable": {"kernel": kernel}}, {"position": 1}, {"c": 1}, {"m": 1})
  ckpt.wait()
  load_mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"))
  target = {"trainable": {"kernel": jax.ShapeDtypeStruct(
      full.shape, full.dtype, sharding=NamedSharding(load_mesh, P("data", "tensor")))}}
  state, data, config, meta, _ = ckpt.restore(1, target)
restored = state["trainable"]["kernel"]
assert restored.sharding == target["trainable"]["kernel"].sharding
for shard in restored.addressable_shards:
  np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
assert (data, config, meta) == ({"position": 1}, {"c": 1}, {"m": 1})
print("restored", jax.process_index(), jax.process_count(), len(restored.addressable_shards))
jax.distributed.shutdown()
"""


def test_two_processes_save_and_restore_on_another_mesh(tmp_path):
  # Two JAX processes of 2 CPU devices each (gloo), started the way scripts/k8s_jobset.yaml does:
  # JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID.
  import subprocess
  import sys

  port = free_port()
  root = pathlib.Path(__file__).resolve().parents[1]
  workers = []
  for process_id in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id)}
    workers.append(subprocess.Popen(
        [sys.executable, "-c", TWO_PROCESS_WORKER, str(tmp_path / "ckpt")], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [worker.communicate(timeout=120) for worker in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  # Last line: gloo prints its own connection lines to stdout first.
  last_lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
  assert last_lines == ["restored 0 2 2", "restored 1 2 2"]
