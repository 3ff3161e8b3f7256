"""Export a trained run to Hugging Face: merged towers, PEFT adapters, and an E2LLM for trust_remote_code.

`python -m e2llm_jax.hf.export --workdir W --out OUT [--adapters-only] [--dtype bfloat16] ...`.
"""

import contextlib
import copy
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from e2llm_jax import checkpoint, cli, errors, towers
from e2llm_jax.hf import bundle
from e2llm_jax.hf.configs import decoder_config_to_hf, encoder_config_to_hf
from e2llm_jax.hf.loading import decoder_tensor_reader, encoder_tensor_reader
from e2llm_jax.hf.peft_adapters import PEFT_TASK_TYPES, lora_modules, write_peft_adapter
from e2llm_jax.hf.safetensors_io import (CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, TensorPlan,
                                         write_safetensors)
from e2llm_jax.hf.weight_names import WeightSpec, decoder_weight_map, encoder_weight_map
from e2llm_jax.models import bert, e2llm, llama, stacking

CHECKPOINTS_DIR = "checkpoints"
MODELING_FILE = "modeling_e2llm.py"
GENERATION_CONFIG_FILE = "generation_config.json"
REMOTE_CODE_CONFIG = {
    "model_type": "e2llm", "architectures": ["E2LLMModel"],
    "auto_map": {"AutoConfig": "modeling_e2llm.E2LLMConfig",
                 "AutoModel": "modeling_e2llm.E2LLMModel"},
}
WEIGHT_MAPS = {"encoder": encoder_weight_map, "decoder": decoder_weight_map}
Reader = Callable[[str], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Reading the run: the trainable tree of one checkpoint step (never the optimizer state).


def _restore_tree(item_dir: pathlib.Path, key: str | None = None) -> Any:
  """A saved pytree item (or its `key` subtree) as numpy, onto one device, whatever mesh saved it."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # The item's own handler, not a checkpointer around it: a checkpointer also looks for a step's
  # metadata file inside the item's folder and logs a warning that it is missing.
  with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
    tree = handler.metadata(item_dir)
    tree = getattr(tree, "tree", tree)
    if key is not None:
      tree = {key: tree[key]}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=key is not None))
  restored = jax.tree.map(np.asarray, restored)
  return restored[key] if key is not None else restored


def _read_json_item(item_dir: pathlib.Path) -> dict:
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    return dict(reader.restore(item_dir))


def restore_for_export(workdir: pathlib.Path, step: int | None = None) -> dict:
  """{"step", "config" (resolved JSON), "meta", "trainable", "frozen" (random-init towers or None)}."""
  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR  # Orbax reads no relative path
  if not directory.is_dir():
    raise errors.CheckpointError(f"{str(workdir)!r} has no {CHECKPOINTS_DIR}/ folder: it is not a "
                                 "training workdir; train first with `python train.py "
                                 f"--config=... --workdir={workdir}`.")
  with checkpoint.Checkpointer(directory, 1, 1 << 30, False) as ckpt:
    steps = sorted(ckpt.all_steps())
  if not steps:
    raise errors.CheckpointError(f"No checkpoint in {str(directory)!r}; train first.")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise errors.CheckpointError(f"--step={step}: {str(workdir)!r} has checkpoints at steps "
                                 f"{steps}; pick one of them.")
  step_dir = directory / str(step)
  frozen_dir = step_dir / checkpoint.FROZEN
  return {"step": step, "config": _read_json_item(step_dir / checkpoint.CONFIG),
          "meta": _read_json_item(step_dir / checkpoint.META),
          "trainable": _restore_tree(step_dir / checkpoint.STATE, "trainable"),
          "frozen": _restore_tree(frozen_dir) if frozen_dir.is_dir() else None}


def _random_tower_config(config: ml_collections.ConfigDict, tower: str):
  # The sizes of a random-init tower, completed as towers.load_model completes them.
  sizes = dict(config.model[tower].random_init)
  if tower == "encoder":
    return bert.EncoderConfig(**sizes)
  sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_heads"])
  sizes.setdefault("num_kv_heads", sizes["num_heads"])
  return llama.DecoderConfig(**sizes)


def params_reader(weight_map: dict[str, WeightSpec], params: Any) -> Reader:
  """`read(hf_name)` over one of our tower trees (either layout): the tensor in HF layout."""

  def read(hf_name: str) -> np.ndarray:
    spec = weight_map[hf_name]
    array = np.asarray(stacking.lookup(params, spec.path))
    return array.T if spec.transpose else array

  return read


def tower_sources(config: ml_collections.ConfigDict, frozen: Any) -> dict[str, tuple[Any, Reader]]:
  """Tower → (its config, a per-tensor reader of its base weights), nothing loaded yet."""
  sources = {}
  for tower, open_reader in (("encoder", encoder_tensor_reader),
                             ("decoder", decoder_tensor_reader)):
    if config.model[tower].path:
      sources[tower] = open_reader(config.model[tower].path)
    else:
      cfg = _random_tower_config(config, tower)
      sources[tower] = (cfg, params_reader(WEIGHT_MAPS[tower](cfg), frozen[tower]))
  return sources


# ----------------------------------------------------------------------------------------------
# Writing one tower: LoRA merged tensor by tensor, as its HF folder.


def write_tower(folder: pathlib.Path, tower: str, cfg: Any, read: Reader, lora_tree: Any = None,
                lora_scale: float = 1.0, dtype: Any = "float32",
                tokenizer_source: str | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """An HF `BertModel` / causal-LM folder; `read` gives base tensors, merged here one at a time."""
  folder.mkdir(parents=True, exist_ok=True)
  dtype = jnp.dtype(dtype)
  weight_map = WEIGHT_MAPS[tower](cfg)
  by_module = {f"{name}.weight": module for module, name in lora_modules(weight_map).items()}
  flat_lora = traverse_util.flatten_dict(stacking.per_layer(lora_tree)) if lora_tree else {}
  merged = {hf_name: module for hf_name, module in by_module.items()
            if module + ("a",) in flat_lora}

  def produce(hf_name: str) -> np.ndarray:
    array = np.asarray(read(hf_name))
    if hf_name in merged:
      a = np.asarray(flat_lora[merged[hf_name] + ("a",)], np.float32)
      b = np.asarray(flat_lora[merged[hf_name] + ("b",)], np.float32)
      array = array.astype(np.float32) + np.float32(lora_scale) * (b.T @ a.T)
    return array.astype(dtype, copy=False)

  plans = [TensorPlan(name, spec.hf_shape, dtype) for name, spec in weight_map.items()]
  write_safetensors(folder, plans, produce, max_shard_bytes)
  hf_config = encoder_config_to_hf(cfg) if tower == "encoder" else decoder_config_to_hf(cfg)
  hf_config["dtype"] = dtype.name
  (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
  if tower == "decoder":
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                  "pad_token_id": cfg.pad_token_id}
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
  if tokenizer_source:
    from e2llm_jax.hf.tokenizers import load_tokenizer
    load_tokenizer(tokenizer_source).save_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# The whole export, written under a temporary sibling name and renamed when complete.


def _check_out(out: pathlib.Path, workdir: pathlib.Path, overwrite: bool) -> None:
  resolved, work = out.resolve(), workdir.resolve()
  if resolved == work or resolved in work.parents:
    raise errors.UserError(f"--out {str(out)!r} would replace the workdir {str(workdir)!r}; "
                           "choose another folder.")
  if out.exists() and not out.is_dir():
    raise errors.UserError(f"--out {str(out)!r} is a file; pass a folder path.")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise errors.UserError(f"--out {str(out)!r} is not empty; pass --overwrite to replace it, or "
                           "choose a new folder.")


def _swap_in(partial: pathlib.Path, out: pathlib.Path) -> None:
  """Rename the finished `partial` folder to `out`, replacing what was there."""
  old = None
  if out.exists():
    old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
  os.rename(partial, out)
  if old is not None:
    shutil.rmtree(old)


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
           overwrite: bool = False, adapters_only: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "float32") -> pathlib.Path:
  """Write the export of `workdir`'s checkpoint `step` (newest by default) to `out`.

  `dtype` (one of `bundle.TRAINED_DTYPES`) is what the trained tensors (`peft/`,
  `adapter.safetensors`) are stored in; merged towers keep the run's `model.*.dtype`. Every process
  must call it (the restore reads on all of them); process 0 alone writes. Base tensors stream from
  their files one at a time, so host memory never holds a whole tower.
  """
  if dtype not in bundle.TRAINED_DTYPES:
    raise errors.UserError(f"--dtype {dtype!r} is not one the trained tensors can be stored in; "
                           f"choose one of {', '.join(bundle.TRAINED_DTYPES)}.")
  workdir = pathlib.Path(workdir).expanduser()
  out = pathlib.Path(out).expanduser().absolute()
  _check_out(out, workdir, overwrite)
  run = restore_for_export(workdir, step)
  config = ml_collections.ConfigDict(run["config"])
  paths = {tower: config.model[tower].path or None for tower in bundle.TOWERS}
  current = checkpoint.base_weights_meta(paths)
  checkpoint.check_fingerprints(run["meta"], current)
  if adapters_only and None in paths.values():
    raise errors.UserError("--adapters-only needs base towers on disk, but this run's "
                           f"{[t for t, p in paths.items() if p is None]} were random init; "
                           "export without --adapters-only.")
  sources = tower_sources(config, run["frozen"])
  model = towers.model_config(config, sources["encoder"][0], sources["decoder"][0])
  if jax.process_index() != 0:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
  partial.mkdir()
  try:
    _write_export(partial, run, config, model, sources, current, adapters_only, max_shard_bytes,
                  dtype)
    _swap_in(partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return out


def _write_export(folder: pathlib.Path, run: dict, config: ml_collections.ConfigDict,
                  model: e2llm.E2LLMConfig, sources: dict, current_meta: dict,
                  adapters_only: bool, max_shard_bytes: int, dtype: str) -> None:
  trainable = run["trainable"]
  loras = {"encoder": model.encoder_lora, "decoder": model.decoder_lora}
  records = {tower: bundle.base_record(config.model[tower].path,
                                       current_meta["base_weights"][tower]["fingerprint"])
             for tower in bundle.TOWERS}
  if not adapters_only:
    for tower in bundle.TOWERS:
      cfg, read = sources[tower]
      lora = loras[tower]
      write_tower(folder / bundle.TOWER_FOLDERS[tower], tower, cfg, read,
                  trainable.get(f"{tower}_lora") if lora else None, lora.scale if lora else 1.0,
                  config.model[tower].dtype, config.model[tower].path or None, max_shard_bytes)
  for tower in bundle.TOWERS:
    if loras[tower] is not None:
      write_peft_adapter(folder / bundle.PEFT_FOLDERS[tower], WEIGHT_MAPS[tower](
          sources[tower][0]), trainable[f"{tower}_lora"], loras[tower],
          records[tower]["hf_name"], PEFT_TASK_TYPES[tower], jnp.dtype(dtype))
  from safetensors.numpy import save_file
  head = {name: array.astype(jnp.dtype(dtype))
          for name, array in bundle.head_state_dict(trainable).items()}
  save_file(head, str(folder / bundle.ADAPTER_FILE), metadata={"format": "pt"})
  stored_config = copy.deepcopy(run["config"])
  for tower in bundle.TOWERS:
    if records[tower]["asset"]:  # found again through its package: no machine path in the export
      stored_config["model"][tower]["path"] = None
  if not adapters_only:
    shutil.copyfile(pathlib.Path(__file__).with_name(MODELING_FILE), folder / MODELING_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(REMOTE_CODE_CONFIG, indent=2) + "\n")
  settings = {
      "format": bundle.BUNDLE_FORMAT, "kind": bundle.ADAPTERS_ONLY if adapters_only else bundle.FULL,
      "step": run["step"], "model": bundle.model_settings(model), "trained_dtype": dtype,
      "data": bundle.data_settings(run["config"], int(model.decoder.max_position_embeddings)),
      "bases": records,
      "towers": None if adapters_only else dict(bundle.TOWER_FOLDERS),
      "peft": {t: bundle.PEFT_FOLDERS[t] if loras[t] else None for t in bundle.TOWERS},
      "config": stored_config,
  }
  # Written last: a folder without it is not an export (load_export says so).
  (folder / bundle.E2LLM_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: Sequence[str]) -> int:
  parser = cli.ArgumentParser(prog="python -m e2llm_jax.hf.export", description=__doc__)
  parser.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/)")
  parser.add_argument("--out", required=True, help="export folder to create")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  parser.add_argument("--adapters-only", action="store_true",
                      help="no merged towers: e2llm_config.json, adapter.safetensors and peft/")
  parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                      help="safetensors shard size of the merged towers")
  parser.add_argument("--dtype", default="float32", choices=bundle.TRAINED_DTYPES,
                      help="dtype of the trained tensors (peft/, adapter.safetensors); bfloat16 "
                      "halves them and loads back as float32")
  args = parser.parse_args(argv)
  out = export(args.workdir, args.out, args.step, args.overwrite, args.adapters_only,
               args.max_shard_bytes, args.dtype)
  print(f"exported {args.workdir} to {out}")
  return 0


if __name__ == "__main__":
  cli.run(main)
