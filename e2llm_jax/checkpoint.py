"""Checkpoints: Orbax manager for train state, data state, config and meta, restorable on any mesh.

Frozen pretrained weights are not saved; `meta` holds their fingerprints and a restore checks them.
A damaged newest step is reported, set aside, and the previous complete one is used.
"""

import hashlib
import os
import pathlib
import sys
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from e2llm_jax import errors

# What one step directory holds. `frozen` exists only for random-init base weights (no path).
STATE, DATA, CONFIG, META, FROZEN = "state", "data", "config", "meta", "frozen"
ITEM_NAMES = (STATE, DATA, CONFIG, META, FROZEN)

DAMAGED_SUFFIX = ".damaged"  # a set-aside step folder: not a step name, so Orbax ignores it
# Bytes hashed from each end of a weight file: enough to catch another checkpoint of the same
# architecture (headers and the first/last tensors differ) while staying fast on 15 GB folders.
FINGERPRINT_EDGE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _fingerprinted_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  return sorted(f for f in path.iterdir() if f.is_file() and (
      f.suffix in WEIGHT_SUFFIXES or f.name == "config.json" or f.name.endswith(".index.json")))


def fingerprint(path: str | os.PathLike) -> str:
  """A fast content fingerprint of base weights: a HF folder or a single (.gguf) file.

  sha256 over each weight file's name, size and first and last MiB (safetensors, gguf, the shard
  index and config.json). File names only, not the folder, so moving the weights keeps it.
  """
  root = pathlib.Path(path).expanduser()
  if not root.exists():
    raise FileNotFoundError(f"Base weights not found at {str(root)!r}.")
  files = _fingerprinted_files(root)
  if not files:
    raise FileNotFoundError(f"No weight files (*.safetensors, *.gguf) or config.json in "
                            f"{str(root)!r}.")
  digest = hashlib.sha256()
  for file in files:
    size = file.stat().st_size
    digest.update(f"{file.name}\0{size}\0".encode())
    with open(file, "rb") as f:
      digest.update(f.read(FINGERPRINT_EDGE_BYTES))
      if size > FINGERPRINT_EDGE_BYTES:
        f.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
        digest.update(f.read())
  return "sha256:" + digest.hexdigest()


def base_weights_meta(paths: Mapping[str, str | os.PathLike | None]) -> dict:
  """`{"base_weights": {tower: {"path", "fingerprint"}}}` for a checkpoint's `meta`.

  `paths` maps a tower name ("encoder", "decoder") to its weights, or None for random init.
  """
  towers = {}
  for name, path in paths.items():
    if path is None:
      towers[name] = {"path": None, "fingerprint": None}
    else:
      towers[name] = {"path": str(path), "fingerprint": fingerprint(path)}
  return {"base_weights": towers}


def check_fingerprints(saved_meta: Mapping[str, Any], current_meta: Mapping[str, Any]) -> None:
  """Raise one error naming every base model that differs from the one the checkpoint trained on."""
  saved = saved_meta.get("base_weights", {})
  current = current_meta.get("base_weights", {})
  problems = []
  for name in sorted(set(saved) | set(current)):
    before = saved.get(name, {"path": None, "fingerprint": None})
    now = current.get(name, {"path": None, "fingerprint": None})
    if before.get("fingerprint") == now.get("fingerprint"):
      continue
    describe = lambda entry: (f"{entry['path']!r} ({entry['fingerprint'][:19]}...)"
                              if entry.get("path") else "random init")
    problems.append(f"{name}: the checkpoint was trained on {describe(before)}, "
                    f"model.{name}.path now gives {describe(now)}")
  if problems:
    raise errors.WeightsError(
        "Base weights differ from the ones this checkpoint was trained on, so its LoRA and "
        "adapter would silently give garbage. " + "; ".join(problems) + ". Fix: point "
        "model.<tower>.path back at the original weights, or start a new workdir.")


def _require_target_shardings(abstract: Any, what: str) -> None:
  # Without a target sharding Orbax rebuilds the saving mesh and fails on another topology
  # (orbax issues #648, #678): every leaf must say where it goes.
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(f"{what}{jax.tree_util.keystr(path)} has no target sharding; build the "
                       "abstract tree as jax.ShapeDtypeStruct(shape, dtype, sharding=...).")


def _key_name(key: Any) -> str:
  for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey (namedtuples)
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
  """{"opt_state.0.mu.w": (shape, dtype)}: leaf names as Orbax writes them, abstract and saved."""
  return {".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(getattr(leaf, "dtype", "")))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _layout_mismatches(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
  problems = [f"{name} is missing from the checkpoint" for name in sorted(set(wanted) - set(saved))]
  problems += [f"{name} is in the checkpoint but not in the current state"
               for name in sorted(set(saved) - set(wanted))]
  def describe(entry, other):  # the dtype only where it is what differs
    return f"{entry[0]}" + (f" {entry[1]}" if entry[1] != other[1] else "")

  problems += [f"{name} is {describe(saved[name], wanted[name])} on disk but "
               f"{describe(wanted[name], saved[name])} now"
               for name in sorted(set(saved) & set(wanted)) if saved[name] != wanted[name]]
  return problems[:limit] + ([f"and {len(problems) - limit} more"] if len(problems) > limit else [])


class Checkpointer:
  """`DIR` of step folders, each with the train state, data state, config and meta (+ frozen).

  Writes are atomic: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames the folder only
  once every host has finished, so a crash mid-save never leaves a step that looks complete
  (`latest_step` ignores the tmp folders, and a new manager removes them). Old steps beyond `keep`
  are deleted only after the newer step is complete. All processes must call `save` and `restore`.
  """

  def __init__(self, directory: str | os.PathLike, every_steps: int, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).expanduser().absolute()
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True),
        # Handlers up front, so a fresh manager (a resumed run) can read metadata before restoring.
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                       FROZEN: ocp.StandardCheckpointHandler()})

  def should_save(self, step: int) -> bool:
    """Every `every_steps` steps, and when JAX reports a preemption notice."""
    return step % self.every_steps == 0 or self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: Mapping[str, Any],
           config_json: Mapping[str, Any], meta: Mapping[str, Any], frozen: Any = None,
           force: bool = False) -> bool:
    """Start saving `step` if due (or `force`); True if a save started (it finishes in background).

    `frozen` is the base weights tree, passed only when they are random init (nothing on disk).
    """
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data_state)),
             CONFIG: ocp.args.JsonSave(dict(config_json)), META: ocp.args.JsonSave(dict(meta))}
    if frozen is not None:
      items[FROZEN] = ocp.args.StandardSave(frozen)
    # `force` here because the decision above is ours: Orbax's own policy would also save the
    # first step of every run.
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def has_frozen(self, step: int) -> bool:
    """Whether `step` holds the (random-init) base weights."""
    return FROZEN in self._manager.item_metadata(step)

  def _frozen_item(self, step: int, abstract_frozen: Any) -> dict:
    """The restore argument for the saved random-init base weights, when `abstract_frozen` asks."""
    if abstract_frozen is None:
      return {}
    _require_target_shardings(abstract_frozen, "abstract_frozen")
    if not self.has_frozen(step):
      raise errors.CheckpointError(
          f"Checkpoint step {step} in {self.directory} holds no base weights: it was trained on "
          "weights from model.*.path. Set those paths again.")
    return {FROZEN: ocp.args.StandardRestore(abstract_frozen)}

  def restore(self, step: int, abstract_state: Any, abstract_frozen: Any = None
              ) -> tuple[Any, dict, dict, dict, Any]:
    """`(state, data_state, config_json, meta, frozen)` of `step`, placed as the abstract trees say.

    Abstract leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))` for the
    current mesh, which may differ from the mesh that wrote the checkpoint. `frozen` is None unless
    `abstract_frozen` is given.
    """
    _require_target_shardings(abstract_state, "abstract_state")
    # Compare names and shapes first: Orbax's own error for a changed tree is long and its
    # cancelled reads print tracebacks at exit.
    saved_state = self._manager.item_metadata(step)[STATE]
    problems = _layout_mismatches(_leaf_shapes(getattr(saved_state, "tree", saved_state)),
                                  _leaf_shapes(abstract_state))
    if problems:
      raise errors.CheckpointError(self._mismatch_message(step, "; ".join(problems)))
    items = {STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
             CONFIG: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()}
    items.update(self._frozen_item(step, abstract_frozen))
    # Names, shapes and dtypes matched above, so a failure to read now means damaged files.
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    frozen = restored[FROZEN] if abstract_frozen is not None else None
    return restored[STATE], restored[DATA], restored[CONFIG], restored[META], frozen

  def restore_params(self, step: int, abstract_trainable: Any, abstract_frozen: Any = None
                     ) -> tuple[Any, dict, Any]:
    """`(trainable, meta, frozen)` of `step` for inference: the optimizer state is never read.

    Abstract trees as in `restore`; `frozen` is None unless `abstract_frozen` is given.
    """
    _require_target_shardings(abstract_trainable, "abstract_trainable")
    saved_state = self._manager.item_metadata(step)[STATE]
    saved_state = getattr(saved_state, "tree", saved_state)
    problems = _layout_mismatches(_leaf_shapes(saved_state["trainable"]),
                                  _leaf_shapes(abstract_trainable))
    if problems:
      raise errors.CheckpointError(self._mismatch_message(step, "; ".join(problems)))
    target = {"trainable": abstract_trainable}
    # The state item read alone, partially: a standard restore would need the optimizer's layout.
    with ocp.PyTreeCheckpointer() as reader:
      state = reader.restore(
          self.directory / str(step) / STATE,
          args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
    items = {META: ocp.args.JsonRestore()}
    items.update(self._frozen_item(step, abstract_frozen))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    frozen = restored[FROZEN] if abstract_frozen is not None else None
    return state["trainable"], restored[META], frozen

  def restore_newest(self, abstract_state: Any, abstract_frozen: Any = None
                     ) -> tuple[int, Any, dict, dict, dict, Any] | None:
    """`(step, *restore(step))` of the newest readable step, or None when there is none.

    A step whose files are truncated or missing is named on stderr, renamed to
    `<step>.damaged` (kept for inspection; training saves that step again), and the previous one
    is tried. A step that does not fit the current state (CheckpointError) stops: older steps
    would not fit either.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, abstract_state, abstract_frozen))
      except errors.UserError:
        raise
      except Exception as error:  # pylint: disable=broad-except  # any read failure is damage
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        aside = self._set_aside(step)
        damaged.append(step)
        print(f"warning: checkpoint step {step} in {self.directory} is damaged ({reason}); "
              f"moved to {aside.name}, trying the previous step", file=sys.stderr, flush=True)
    if damaged:
      raise errors.CheckpointError(
          f"every checkpoint in {self.directory} is damaged (steps {damaged}, now *{DAMAGED_SUFFIX}"
          "); delete the workdir to start over, or restore the checkpoints from a backup")
    return None

  def _set_aside(self, step: int) -> pathlib.Path:
    """Rename a damaged step folder so it is no longer a step; returns the new path."""
    source = self.directory / str(step)
    target = self.directory / f"{step}{DAMAGED_SUFFIX}"
    index = 1
    while target.exists():
      target = self.directory / f"{step}{DAMAGED_SUFFIX}.{index}"
      index += 1
    if jax.process_index() == 0:
      source.rename(target)
    self._manager.reload()
    return target

  def _mismatch_message(self, step: int, details: str) -> str:
    return (f"Checkpoint step {step} in {self.directory} does not fit the current train state "
            "(were LoRA ranks or targets, pooling, adapter, optimizer settings or "
            "model.scan_layers changed?): "
            f"{details}. Use the config of the run that wrote it, or start a new workdir.")

  def wait(self) -> None:
    """Block until every started save is on disk (call before exit and before reading it)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves, then release Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
