"""Safetensors checkpoints: HF model folders (single or sharded), read one tensor at a time.

Owns the folder layout names (config.json, model.safetensors, the shard index).
"""

import json
import pathlib
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from e2llm_jax.errors import WeightsError
from e2llm_jax.hf.weight_names import WeightSpec, check_names_and_shapes, renamed_keys

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def existing_path(path: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what} path {str(path)!r} does not exist; check the path.")
  return path


def folder_or_gguf(path: str | pathlib.Path, what: str, folder: str = "model folder"
                   ) -> pathlib.Path:
  """`path` checked to exist and to be a folder or a `.gguf` file (the decoder's two forms)."""
  path = existing_path(path, what)
  if path.is_file() and path.suffix != ".gguf":
    raise WeightsError(f"{what} path {str(path)!r} is a file but not a .gguf; pass a Hugging "
                       f"Face {folder} or a .gguf file.")
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
    raise WeightsError(
        f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); only safetensors and "
        "GGUF are read (pickles can run arbitrary code). Convert once with transformers: "
        "`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
        "(AutoModelForCausalLM for a decoder).")
  others = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
  hint = f" (found {others}; a PEFT adapter is not a base model)" if others else ""
  raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE}"
                          f"{hint}.")


class SafetensorsCheckpoint:
  """Names and shapes of every tensor in a (sharded) checkpoint, from the files' own headers, and
  reads of one tensor at a time into memory of its own.

  Not through safetensors' memory map: the pages it touches count as this process's memory while
  the checkpoint is open (a float32 SmolLM2 folder loaded with a peak of 2.2x its size), and its
  numpy reader has no bfloat16.
  """

  def __init__(self, files: list[pathlib.Path]):
    # name -> (file, where its data starts, the header's entry: dtype, shape, data_offsets)
    self.location: dict[str, tuple[pathlib.Path, int, dict]] = {}
    for file in files:
      data_start, header = _read_header(file)
      self.location.update({name: (file, data_start, entry) for name, entry in header.items()})

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: tuple(entry["shape"]) for name, (_, _, entry) in self.location.items()}

  def read(self, name: str) -> np.ndarray:
    file, data_start, entry = self.location[name]
    begin, end = entry["data_offsets"]
    raw = np.fromfile(file, dtype=np.uint8, count=end - begin, offset=data_start + begin)
    return raw.view(STORED_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_header(file: pathlib.Path) -> tuple[int, dict]:
  """(where the data starts, each tensor's header entry) of one file: the format's own 8-byte size
  + JSON, checked against the file's length so that a truncated download is named as such."""
  length = file.stat().st_size
  with open(file, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    try:
      header = json.loads(f.read(size)) if 8 + size <= length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
      header = None
  if header is not None:
    header.pop("__metadata__", None)
  if header is None or 8 + size + max((e["data_offsets"][1] for e in header.values()),
                                      default=0) > length:
    raise WeightsError(f"{file} is not a complete safetensors file (header or data cut short); "
                       "download or copy it again.")
  unknown = sorted({entry["dtype"] for entry in header.values()} - set(STORED_DTYPES))
  if unknown:
    raise WeightsError(f"{file} stores tensors as {unknown}, which are not read; supported: "
                       f"{sorted(STORED_DTYPES)}.")
  return 8 + size, header


def load_as_float32(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of one small safetensors file (trained adapters), floating ones as float32.

  Adapters may be stored in bfloat16 to halve the download; computation reads them in float32.
  """
  from safetensors.numpy import load_file
  return {name: array.astype(np.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array
          for name, array in load_file(str(path)).items()}


def safetensors_tensor_reader(folder: pathlib.Path, weight_map: dict[str, WeightSpec],
                              renamer_for: Callable[[list[str]], Callable[[str], str | None]],
                              what: str) -> Callable[[str], np.ndarray]:
  """`read(hf_name)`: one tensor of the folder, as stored, after checking every name and shape."""
  checkpoint = SafetensorsCheckpoint(safetensors_files(folder))
  file_shapes = checkpoint.shapes()
  names = renamed_keys(file_shapes, renamer_for(list(file_shapes)))
  check_names_and_shapes(weight_map, {ours: file_shapes[theirs] for ours, theirs in names.items()},
                         folder, what)
  return lambda name: checkpoint.read(names[name])


# ----------------------------------------------------------------------------------------------
# Writing: shards planned from names and shapes, each tensor streamed in when its turn comes.

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
                      "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
STORED_DTYPES = {code: jnp.dtype(name) for name, code in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
# The format pads its JSON header with spaces to a multiple of this many bytes.
HEADER_ALIGNMENT = 8


class TensorPlan(NamedTuple):
  """One tensor to write: its name, shape and numpy dtype (the data comes later, from a callback)."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
  """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)."""
  shards, current, size = [], [], 0
  for plan in plans:
    if current and size + plan.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(plan)
    size += plan.nbytes
  return shards + [current] if current or not shards else shards


def shard_file_names(num_shards: int) -> list[str]:
  """transformers' names: model.safetensors, or model-0000i-of-0000n.safetensors when sharded."""
  if num_shards == 1:
    return [SAFETENSORS_FILE]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _header_bytes(plans: list[TensorPlan], metadata: dict[str, str]) -> bytes:
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for plan in plans:
    dtype_name = np.dtype(plan.dtype).name
    if dtype_name not in SAFETENSORS_DTYPES:
      raise ValueError(f"Tensor {plan.name!r} has dtype {dtype_name}, which safetensors cannot hold.")
    header[plan.name] = {"dtype": SAFETENSORS_DTYPES[dtype_name], "shape": list(plan.shape),
                         "data_offsets": [offset, offset + plan.nbytes]}
    offset += plan.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
  return len(encoded).to_bytes(8, "little") + encoded


def write_safetensors(folder: pathlib.Path, plans: list[TensorPlan],
                      produce: Callable[[str], np.ndarray],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
  """Write `plans` as an HF safetensors checkpoint in `folder`; returns the file names written.

  `produce(name)` is called once per tensor, in order, and its array is written and dropped before
  the next call, so memory holds one tensor at a time whatever the model size. Several shards get
  a `model.safetensors.index.json`, as transformers writes it.
  """
  metadata = {"format": "pt", **(metadata or {})}
  shards = plan_shards(plans, max_shard_bytes)
  names = shard_file_names(len(shards))
  for file_name, shard in zip(names, shards):
    with open(folder / file_name, "wb") as f:
      f.write(_header_bytes(shard, metadata))
      for plan in shard:
        array = np.asarray(produce(plan.name))
        if array.shape != tuple(plan.shape) or array.dtype != np.dtype(plan.dtype):
          raise ValueError(f"Tensor {plan.name!r} came as {array.dtype}{list(array.shape)}, planned "
                           f"as {np.dtype(plan.dtype)}{list(plan.shape)}.")
        f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # no copy
        del array
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)},
             "weight_map": {p.name: file_name for file_name, shard in zip(names, shards)
                            for p in shard}}
    with open(folder / SAFETENSORS_INDEX_FILE, "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return names
