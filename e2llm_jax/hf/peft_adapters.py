"""Our LoRA trees ↔ PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`), both ways.

Names are peft's: `base_model.model.<HF module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
"""

import json
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from e2llm_jax.hf.safetensors_io import load_as_float32
from e2llm_jax.hf.weight_names import WeightSpec
from e2llm_jax.models import stacking
from e2llm_jax.models.lora import LoRAConfig

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# peft's task type per tower: a causal LM for the decoder; the BERT encoder is a plain PeftModel.
PEFT_TASK_TYPES = {"encoder": None, "decoder": "CAUSAL_LM"}


def lora_modules(weight_map: dict[str, WeightSpec]) -> dict[tuple[str, ...], str]:
  """Our Dense module path → its HF module name (the `.weight` name without the suffix)."""
  return {spec.path[:-1]: hf_name[:-len(".weight")] for hf_name, spec in weight_map.items()
          if spec.transpose}


def target_modules(weight_map: dict[str, WeightSpec], targeted: list[str]) -> list[str]:
  """peft `target_modules`: short names (`q_proj`) when they pick exactly `targeted`, else full names."""
  all_modules = set(lora_modules(weight_map).values())
  short = sorted({name.rsplit(".", 1)[-1] for name in targeted})
  picked = {name for name in all_modules if name.rsplit(".", 1)[-1] in short}
  return short if picked == set(targeted) else sorted(targeted)


def peft_state_dict(weight_map: dict[str, WeightSpec], lora_tree: Any) -> dict[str, np.ndarray]:
  """peft's adapter tensors from our `{module: {"a": [in, r], "b": [r, out]}}` tree (b unscaled;
  stacked or per layer)."""
  modules = lora_modules(weight_map)
  flat = traverse_util.flatten_dict(stacking.per_layer(lora_tree))
  state = {}
  for path, a in flat.items():
    if path[-1] != "a":
      continue
    module = path[:-1]
    if module not in modules:
      raise ValueError(f"LoRA module {'/'.join(module)} is not a Linear layer of the HF model.")
    name = PEFT_PREFIX + modules[module]
    state[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).T)
    state[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(flat[module + ("b",)]).T)
  return state


def lora_tree_from_peft(weight_map: dict[str, WeightSpec], state: dict[str, np.ndarray],
                        source: str) -> dict:
  """The inverse of peft_state_dict, per layer (`stacking.in_layout` stacks it for a scanned tower)."""
  by_hf_name = {name: module for module, name in lora_modules(weight_map).items()}
  flat = {}
  for key, tensor in state.items():
    stem, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
    if not key.startswith(PEFT_PREFIX) or stem not in by_hf_name or factor not in ("A.weight",
                                                                                   "B.weight"):
      raise ValueError(f"{source}: adapter tensor {key!r} does not belong to this model's Linear "
                       "layers; was the adapter trained on another architecture?")
    flat[by_hf_name[stem] + ("a" if factor == "A.weight" else "b",)] = np.ascontiguousarray(
        np.asarray(tensor).T)
  return traverse_util.unflatten_dict(flat)


def peft_config(lora: LoRAConfig, targets: list[str], base_model: str | None,
                task_type: str | None) -> dict:
  """A LoRA `adapter_config.json`; keys peft leaves out take peft's defaults."""
  return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
          "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
          "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "inference_mode": True,
          "init_lora_weights": True, "modules_to_save": None}


def write_peft_adapter(folder: pathlib.Path, weight_map: dict[str, WeightSpec], lora_tree: Any,
                       lora: LoRAConfig, base_model: str | None, task_type: str | None,
                       dtype: Any = np.float32) -> None:
  """`adapter_config.json` and `adapter_model.safetensors` (tensors in `dtype`) in `folder`."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  state = {name: array.astype(dtype) for name, array in
           peft_state_dict(weight_map, lora_tree).items()}
  modules = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in state})
  with open(folder / PEFT_CONFIG_FILE, "w") as f:
    json.dump(peft_config(lora, target_modules(weight_map, modules), base_model, task_type), f,
              indent=2)
  save_file(state, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


def read_peft_adapter(folder: pathlib.Path, weight_map: dict[str, WeightSpec],
                      targets: str) -> tuple[LoRAConfig, dict]:
  """(LoRAConfig, our float32 LoRA tree) of a PEFT LoRA folder; `targets` is our regex, for the record."""
  config_path, weights_path = folder / PEFT_CONFIG_FILE, folder / PEFT_WEIGHTS_FILE
  for path in (config_path, weights_path):
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing; a PEFT adapter folder holds {PEFT_CONFIG_FILE} "
                              f"and {PEFT_WEIGHTS_FILE}. Export again.")
  with open(config_path) as f:
    settings = json.load(f)
  if settings.get("peft_type") != "LORA" or settings.get("use_rslora") or settings.get("use_dora"):
    raise ValueError(f"{config_path}: only plain LoRA adapters are read (peft_type LORA, no rsLoRA "
                     "or DoRA).")
  lora = LoRAConfig(int(settings["r"]), float(settings["lora_alpha"]), targets,
                    float(settings.get("lora_dropout", 0.0)))
  return lora, lora_tree_from_peft(weight_map, load_as_float32(weights_path), str(weights_path))
