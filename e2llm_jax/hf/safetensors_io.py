"""Safetensors checkpoints: HF model folders (single or sharded), read one tensor at a time.

Owns the folder layout names (config.json, model.safetensors, the shard index).
"""

import json
import pathlib
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from e2llm_jax.hf.weight_names import WeightSpec, assemble, check_names_and_shapes, renamed_keys

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def existing_path(path: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what} path {str(path)!r} does not exist.")
  return path


def read_config(folder: pathlib.Path) -> dict:
  config_path = folder / CONFIG_FILE
  if not config_path.is_file():
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f" It holds {ggufs}: pass the .gguf file itself." if ggufs else ""
    raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; expected a Hugging Face model folder "
                            f"(config.json + model.safetensors).{hint}")
  with open(config_path) as f:
    return json.load(f)


def safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The checkpoint's safetensors files, or an error that says how to get them."""
  index_path = folder / SAFETENSORS_INDEX_FILE
  if index_path.is_file():
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [str(f.name) for f in files if not f.is_file()]
    if absent:
      raise FileNotFoundError(f"{index_path} lists shards that are not in {folder}: {absent}.")
    return files
  if (folder / SAFETENSORS_FILE).is_file():
    return [folder / SAFETENSORS_FILE]
  pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise ValueError(
        f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); only safetensors and "
        "GGUF are read (pickles can run arbitrary code). Convert once with transformers: "
        "`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
        "(AutoModelForCausalLM for a decoder).")
  others = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
  hint = f" (found {others}; a PEFT adapter is not a base model)" if others else ""
  raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}"
                          f"{hint}.")


# numpy has no bfloat16 / float8, so safetensors' numpy reader refuses them; ml_dtypes has them.
_ML_DTYPES = {"BF16": jnp.bfloat16, "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}


class SafetensorsCheckpoint:
  """Names and shapes of every tensor in a (sharded) checkpoint, and reads of one tensor at a time."""

  def __init__(self, files: list[pathlib.Path]):
    from safetensors import safe_open
    self.files = files
    self.handles = [safe_open(str(f), framework="np") for f in files]
    self.headers: dict[pathlib.Path, tuple[int, dict]] = {}
    self.location: dict[str, tuple[int, Any]] = {}
    for i, handle in enumerate(self.handles):
      for name in handle.keys():
        self.location[name] = (i, handle.get_slice(name))

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: tuple(piece.get_shape()) for name, (_, piece) in self.location.items()}

  def read(self, name: str) -> np.ndarray:
    i, piece = self.location[name]
    exotic = _ML_DTYPES.get(piece.get_dtype())
    if exotic is None:
      return self.handles[i].get_tensor(name)
    return self._read_raw(self.files[i], name, np.dtype(exotic))

  def _header(self, file: pathlib.Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of one file: the format's own 8-byte size + JSON."""
    if file not in self.headers:
      with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        self.headers[file] = (8 + size, json.loads(f.read(size)))
    return self.headers[file]

  def _read_raw(self, file: pathlib.Path, name: str, dtype: np.dtype) -> np.ndarray:
    data_start, header = self._header(file)
    begin, end = header[name]["data_offsets"]
    raw = np.fromfile(file, dtype=np.uint8, count=end - begin, offset=data_start + begin)
    return raw.view(dtype).reshape(header[name]["shape"])


def load_safetensors_tower(folder: pathlib.Path, weight_map: dict[str, WeightSpec],
                            renamer_for: Callable[[list[str]], Callable[[str], str | None]],
                            dtype: Any, what: str) -> dict:
  checkpoint = SafetensorsCheckpoint(safetensors_files(folder))
  file_shapes = checkpoint.shapes()
  names = renamed_keys(file_shapes, renamer_for(list(file_shapes)))
  check_names_and_shapes(weight_map, {ours: file_shapes[theirs] for ours, theirs in names.items()},
                          folder, what)
  return assemble(weight_map, lambda name: checkpoint.read(names[name]), dtype)
