"""A trained model for inference from disk: a training workdir (config.json + checkpoint) or an export.

Arrays land sharded on the mesh; a run's saved config is read over today's base config.
"""

import json
import pathlib
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections

from e2llm_jax import checkpoint, config_utils, errors, sharding, towers
from e2llm_jax.models import e2llm

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_MESH_SHAPE = (1, -1, 1)  # every device on fsdp, as the configs train
# Config mappings whose keys are the user's (task names, tower sizes): read whole, never merged.
FREE_FORM_KEYS = ("tasks", "templates", "tfds_names", "random_init")


class LoadedModel(NamedTuple):
  """What an engine is built from (the arguments of `E2LLM.__init__`)."""
  config: ml_collections.ConfigDict
  model: e2llm.E2LLMConfig
  frozen: Any
  trainable: Any
  encoder_tokenizer: Any
  decoder_tokenizer: Any
  mesh: jax.sharding.Mesh
  step: int | None


def default_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return sharding.make_mesh(DEFAULT_MESH_SHAPE, config.mesh.axes)


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config training wrote to `workdir/config.json`, over today's base config (so a
  run written before a key existed reads that key's default)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} does not exist: {str(workdir)!r} is not a training "
                            "workdir; train first with `python train.py --config=... "
                            f"--workdir={workdir}`.")
  return config_from_json(json.loads(path.read_text()))


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A saved resolved config (JSON types) over the base config."""
  config = config_utils.base_config()
  _overlay(config, saved)
  if "scan_layers" not in saved.get("model", {}):
    config.model.scan_layers = False  # written before towers scanned: its LoRA trees are per layer
  return config


def _overlay(node: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> None:
  """Saved JSON values onto `node`: settings sections merge, mappings (FREE_FORM_KEYS) replace."""
  for key, value in saved.items():
    current = node[key] if key in node else None
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict) and (
        key not in FREE_FORM_KEYS):
      _overlay(current, value)
    else:
      node[key] = _from_json(value)


def _from_json(value: Any) -> Any:
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _from_json(v) for k, v in value.items()})
  if isinstance(value, list):  # JSON has no tuples; configs hold tuples (mesh shape, rules)
    return tuple(_from_json(v) for v in value)
  return value


def load_workdir(workdir: str | pathlib.Path, step: int | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """The run in `workdir`: its config.json and the trainable params of checkpoint `step`
  (newest by default; the optimizer state is not read); base weights from the config's paths
  (checked against the checkpoint's fingerprints) or, for random towers, from the checkpoint."""
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  mesh = mesh if mesh is not None else default_mesh(config)
  rules = config.mesh.rules
  model, numpy_weights = towers.load_model(config)
  frozen_rng, trainable_rng, _ = jax.random.split(jax.random.key(int(config.seed)), 3)
  frozen, frozen_shardings = towers.frozen_towers(model, numpy_weights, mesh, rules, frozen_rng,
                                                  with_weights=False)
  abstract_trainable, trainable_shardings = towers.trainable_layout(model, frozen, mesh, rules,
                                                                    trainable_rng)
  paths = towers.base_paths(config)
  random_towers = [name for name, path in paths.items() if not path]
  abstract_frozen = {name: sharding.abstract_with_shardings(frozen[name], frozen_shardings[name])
                     for name in random_towers} or None
  with checkpoint.Checkpointer(workdir / CHECKPOINTS_DIR, 1, 1 << 30, False) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {str(workdir / CHECKPOINTS_DIR)!r}: train "
                              f"first with `python train.py --config=... --workdir={workdir}`.")
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise errors.CheckpointError(f"step {step}: {str(workdir)!r} has checkpoints at steps "
                                   f"{sorted(steps)}; pick one of them.")
    trainable, meta, restored = ckpt.restore_params(
        step, sharding.abstract_with_shardings(abstract_trainable, trainable_shardings),
        abstract_frozen)
  checkpoint.check_fingerprints(meta, checkpoint.base_weights_meta(
      {name: path or None for name, path in paths.items()}))
  frozen = {**frozen, **(restored or {})}
  encoder_tokenizer = decoder_tokenizer = None
  if not random_towers:
    from e2llm_jax import hf  # pylint: disable=g-import-not-at-top
    encoder_tokenizer = hf.load_tokenizer(paths["encoder"])
    decoder_tokenizer = hf.load_tokenizer(paths["decoder"])
  return LoadedModel(config, model, frozen, trainable, encoder_tokenizer, decoder_tokenizer, mesh,
                     step)


def load_export(export_dir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                encoder_path: str | pathlib.Path | None = None,
                decoder_path: str | pathlib.Path | None = None) -> LoadedModel:
  """A full or adapters-only export (`python -m e2llm_jax.hf.export`, read by `hf.bundle`); an
  adapters-only one finds its base towers at `*_path`, else where the export recorded them."""
  from e2llm_jax import hf  # pylint: disable=g-import-not-at-top
  from e2llm_jax.hf import bundle  # pylint: disable=g-import-not-at-top
  saved, model, numpy_frozen, numpy_trainable = bundle.load_export(export_dir, encoder_path,
                                                                   decoder_path)
  config = config_from_json(saved)
  mesh = mesh if mesh is not None else default_mesh(config)
  frozen_rng, trainable_rng, _ = jax.random.split(jax.random.key(int(config.seed)), 3)
  frozen, _ = towers.frozen_towers(model, numpy_frozen, mesh, config.mesh.rules, frozen_rng)
  _, trainable_shardings = towers.trainable_layout(model, frozen, mesh, config.mesh.rules,
                                                   trainable_rng)
  trainable = jax.device_put(numpy_trainable, trainable_shardings)
  return LoadedModel(config, model, frozen, trainable,
                     hf.load_tokenizer(config.model.encoder.path),
                     hf.load_tokenizer(config.model.decoder.path), mesh, None)
