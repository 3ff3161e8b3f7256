"""Hugging Face folders (safetensors, single or sharded) and llama.cpp GGUF files → our towers.

Owns the config translation both ways, the HF name maps both ways, and the GGUF tokenizer; export reuses them.
"""

import functools
import json
import pathlib
from typing import Any, Callable, Iterable, NamedTuple

import jax.numpy as jnp
import numpy as np

from e2llm_jax.models.bert import EncoderConfig
from e2llm_jax.models.llama import ROPE_TYPES, DecoderConfig

ENCODER_MODEL_TYPES = ("bert",)
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")
GGUF_ARCHITECTURES = ("llama", "qwen2")
DECODER_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}
# transformers' own defaults for keys a config.json may leave out (LlamaConfig(), MistralConfig(), ...).
DECODER_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}
# The rope settings each supported rope type reads; every one is stored as a float in DecoderConfig.
ROPE_PARAM_NAMES = {"default": (), "linear": ("factor",),
                    "llama3": ("factor", "high_freq_factor", "low_freq_factor",
                               "original_max_position_embeddings")}
ROPE_INT_PARAMS = ("original_max_position_embeddings",)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# How many names per problem kind an import error lists before it only counts the rest.
MAX_LISTED = 40


# ----------------------------------------------------------------------------------------------
# Config translation.


def _require(hf_config: dict, key: str, source: str) -> Any:
  if hf_config.get(key) is None:
    raise ValueError(f"{source} lacks {key!r}, which the model needs.")
  return hf_config[key]


def _first_id(value: Any) -> int | None:
  # Several HF configs list more than one eos id; generation stops on the first, which is enough here.
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def encoder_config_from_hf(hf_config: dict, source: str = "config.json") -> EncoderConfig:
  """EncoderConfig from a BERT-family `config.json` dict (model_type `bert`)."""
  model_type = hf_config.get("model_type")
  if model_type not in ENCODER_MODEL_TYPES:
    raise ValueError(f"{source}: encoder model_type {model_type!r} is not supported; supported: "
                     f"{list(ENCODER_MODEL_TYPES)} (BERT-family models such as MiniLM, GTE, BGE, E5).")
  position_type = hf_config.get("position_embedding_type") or "absolute"
  if position_type != "absolute":
    raise ValueError(f"{source}: position_embedding_type {position_type!r} is not supported; "
                     "only 'absolute' is.")
  return EncoderConfig(
      vocab_size=int(_require(hf_config, "vocab_size", source)),
      hidden_size=int(_require(hf_config, "hidden_size", source)),
      num_layers=int(_require(hf_config, "num_hidden_layers", source)),
      num_heads=int(_require(hf_config, "num_attention_heads", source)),
      intermediate_size=int(_require(hf_config, "intermediate_size", source)),
      max_position_embeddings=int(hf_config.get("max_position_embeddings", 512)),
      type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
      layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
      hidden_act=hf_config.get("hidden_act", "gelu"),
      pad_token_id=int(hf_config.get("pad_token_id") or 0),
      model_type=model_type)


def encoder_config_to_hf(cfg: EncoderConfig) -> dict:
  """A transformers-5 `config.json` dict for `BertModel` with `cfg`'s architecture."""
  return {
      "architectures": ["BertModel"], "model_type": "bert",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
      "hidden_act": cfg.hidden_act, "pad_token_id": cfg.pad_token_id,
      "position_embedding_type": "absolute", "dtype": "float32",
  }


def _rope_from_hf(hf_config: dict, source: str) -> tuple[float, str, tuple[tuple[str, float], ...]]:
  """(theta, type, params) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  rope_parameters = hf_config.get("rope_parameters")
  if isinstance(rope_parameters, dict) and rope_parameters:
    scaling = rope_parameters
    theta = rope_parameters.get("rope_theta", hf_config.get("rope_theta"))
  else:
    scaling = hf_config.get("rope_scaling") or {}
    theta = hf_config.get("rope_theta")
  theta = 10000.0 if theta is None else float(theta)
  rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                     f"{list(ROPE_TYPES)}.")
  missing = [name for name in ROPE_PARAM_NAMES[rope_type] if scaling.get(name) is None]
  if missing:
    raise ValueError(f"{source}: rope type {rope_type!r} needs {missing} in its rope settings.")
  params = tuple(sorted((name, float(scaling[name])) for name in ROPE_PARAM_NAMES[rope_type]))
  return theta, rope_type, params


def _sliding_window_from_hf(hf_config: dict, model_type: str, num_layers: int,
                            source: str) -> int | None:
  if model_type == "mistral":
    return hf_config.get("sliding_window")
  if model_type != "qwen2":
    return None
  layer_types = hf_config.get("layer_types")
  if layer_types is None:
    # Before transformers 5, Qwen2 slid its window only from layer `max_window_layers` on.
    if not hf_config.get("use_sliding_window"):
      return None
    first_sliding = hf_config.get("max_window_layers", num_layers)
    layer_types = ["sliding_attention" if i >= first_sliding else "full_attention"
                   for i in range(num_layers)]
  kinds = set(layer_types)
  if kinds == {"full_attention"} or not hf_config.get("use_sliding_window", True):
    return None
  if kinds != {"sliding_attention"}:
    raise ValueError(f"{source}: Qwen2 with sliding attention on only some layers "
                     "(max_window_layers / layer_types) is not supported; the decoder applies one "
                     "window to every layer.")
  return int(_require(hf_config, "sliding_window", source))


def decoder_config_from_hf(hf_config: dict, source: str = "config.json") -> DecoderConfig:
  """DecoderConfig from a Llama / Mistral / Qwen2 `config.json` dict (old or transformers-5 format)."""
  model_type = hf_config.get("model_type")
  if model_type not in DECODER_MODEL_TYPES:
    raise ValueError(f"{source}: decoder model_type {model_type!r} is not supported; supported: "
                     f"{list(DECODER_MODEL_TYPES)} (SmolLM2 is 'llama').")
  hidden_size = int(_require(hf_config, "hidden_size", source))
  num_heads = int(_require(hf_config, "num_attention_heads", source))
  num_layers = int(_require(hf_config, "num_hidden_layers", source))
  theta, rope_type, rope_params = _rope_from_hf(hf_config, source)
  hf_config = {**DECODER_DEFAULTS[model_type], **hf_config}  # a key present, even as null, wins
  if model_type == "qwen2":
    qkv_bias, o_bias = True, False  # Qwen2 always has q/k/v biases and never an output bias.
  elif model_type == "llama":
    qkv_bias = o_bias = bool(hf_config.get("attention_bias", False))
  else:
    qkv_bias = o_bias = False
  return DecoderConfig(
      vocab_size=int(_require(hf_config, "vocab_size", source)),
      hidden_size=hidden_size,
      intermediate_size=int(_require(hf_config, "intermediate_size", source)),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
      head_dim=int(hf_config.get("head_dim") or hidden_size // num_heads),
      rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_type=rope_type,
      rope_params=rope_params,
      max_position_embeddings=int(hf_config["max_position_embeddings"]),
      tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(hf_config.get("mlp_bias", False)) if model_type == "llama" else False,
      sliding_window=_sliding_window_from_hf(hf_config, model_type, num_layers, source),
      hidden_act=hf_config.get("hidden_act", "silu"),
      bos_token_id=_first_id(hf_config.get("bos_token_id")),
      eos_token_id=_first_id(hf_config.get("eos_token_id")),
      pad_token_id=_first_id(hf_config.get("pad_token_id")),
      model_type=model_type)


def decoder_config_to_hf(cfg: DecoderConfig) -> dict:
  """A transformers-5 `config.json` dict for `cfg.model_type`'s causal LM with `cfg`'s architecture."""
  if cfg.model_type not in DECODER_MODEL_TYPES:
    raise ValueError(f"Decoder model_type {cfg.model_type!r} has no HF form; supported: "
                     f"{list(DECODER_MODEL_TYPES)}.")
  rope_parameters = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
  for name, value in cfg.rope_params:
    rope_parameters[name] = int(value) if name in ROPE_INT_PARAMS else value
  hf_config = {
      "architectures": [DECODER_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope_parameters,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": cfg.hidden_act,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id, "dtype": "float32",
  }
  unexpressible = []
  if cfg.model_type == "llama":
    if cfg.qkv_bias != cfg.o_bias:
      unexpressible.append(f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias}")
    if cfg.sliding_window is not None:
      unexpressible.append(f"sliding_window={cfg.sliding_window}")
    hf_config.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "mistral":
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
      unexpressible.append("attention or MLP biases")
    # Written even when None: MistralConfig's own default is a 4096 window.
    hf_config["sliding_window"] = cfg.sliding_window
  else:
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
      unexpressible.append(f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias} "
                           "(Qwen2 has exactly q/k/v biases)")
    sliding = cfg.sliding_window is not None
    hf_config.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                     max_window_layers=0 if sliding else cfg.num_layers)
  if unexpressible:
    raise ValueError(f"A {cfg.model_type!r} HF config cannot express {'; '.join(unexpressible)}.")
  return hf_config


# ----------------------------------------------------------------------------------------------
# Name maps: one table per tower, read in both directions.


class WeightSpec(NamedTuple):
  """Where one HF tensor lives in our tree, its HF shape, and whether it is a torch Linear weight."""
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  transpose: bool  # torch Linear weight [out, in] ↔ our Dense kernel [in, out]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def _linear(table: dict, hf_name: str, path: tuple[str, ...], out_features: int, in_features: int,
            bias: bool) -> None:
  table[f"{hf_name}.weight"] = WeightSpec(path + ("kernel",), (out_features, in_features), True)
  if bias:
    table[f"{hf_name}.bias"] = WeightSpec(path + ("bias",), (out_features,), False)


def _layer_norm(table: dict, hf_name: str, path: tuple[str, ...], width: int) -> None:
  table[f"{hf_name}.weight"] = WeightSpec(path + ("scale",), (width,), False)
  table[f"{hf_name}.bias"] = WeightSpec(path + ("bias",), (width,), False)


def encoder_weight_map(cfg: EncoderConfig) -> dict[str, WeightSpec]:
  """HF `BertModel` tensor name (no `bert.` prefix) → where it lives in our encoder tree."""
  width = cfg.hidden_size
  table = {
      "embeddings.word_embeddings.weight":
          WeightSpec(("word_embeddings", "embedding"), (cfg.vocab_size, width), False),
      "embeddings.position_embeddings.weight":
          WeightSpec(("position_embeddings", "embedding"), (cfg.max_position_embeddings, width),
                     False),
      "embeddings.token_type_embeddings.weight":
          WeightSpec(("token_type_embeddings", "embedding"), (cfg.type_vocab_size, width), False),
  }
  _layer_norm(table, "embeddings.LayerNorm", ("embeddings_norm",), width)
  for i in range(cfg.num_layers):
    hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
    for name in ("query", "key", "value"):
      _linear(table, f"{hf}.attention.self.{name}", ours + (name,), width, width, True)
    _linear(table, f"{hf}.attention.output.dense", ours + ("attention_output",), width, width, True)
    _layer_norm(table, f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",), width)
    _linear(table, f"{hf}.intermediate.dense", ours + ("intermediate",), cfg.intermediate_size,
            width, True)
    _linear(table, f"{hf}.output.dense", ours + ("output",), width, cfg.intermediate_size, True)
    _layer_norm(table, f"{hf}.output.LayerNorm", ours + ("output_norm",), width)
  return table


def decoder_weight_map(cfg: DecoderConfig) -> dict[str, WeightSpec]:
  """HF `*ForCausalLM` tensor name (with `model.` prefix) → where it lives in our decoder tree."""
  width, q_width = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  kv_width = cfg.num_kv_heads * cfg.head_dim
  table = {
      "model.embed_tokens.weight":
          WeightSpec(("embed_tokens", "embedding"), (cfg.vocab_size, width), False),
      "model.norm.weight": WeightSpec(("norm", "scale"), (width,), False),
  }
  if not cfg.tie_word_embeddings:
    _linear(table, "lm_head", ("lm_head",), cfg.vocab_size, width, False)
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", (f"layers_{i}",)
    table[f"{hf}.input_layernorm.weight"] = WeightSpec(ours + ("input_layernorm", "scale"),
                                                       (width,), False)
    table[f"{hf}.post_attention_layernorm.weight"] = WeightSpec(
        ours + ("post_attention_layernorm", "scale"), (width,), False)
    attn = ours + ("self_attn",)
    _linear(table, f"{hf}.self_attn.q_proj", attn + ("q_proj",), q_width, width, cfg.qkv_bias)
    _linear(table, f"{hf}.self_attn.k_proj", attn + ("k_proj",), kv_width, width, cfg.qkv_bias)
    _linear(table, f"{hf}.self_attn.v_proj", attn + ("v_proj",), kv_width, width, cfg.qkv_bias)
    _linear(table, f"{hf}.self_attn.o_proj", attn + ("o_proj",), width, q_width, cfg.o_bias)
    mlp = ours + ("mlp",)
    _linear(table, f"{hf}.mlp.gate_proj", mlp + ("gate_proj",), cfg.intermediate_size, width,
            cfg.mlp_bias)
    _linear(table, f"{hf}.mlp.up_proj", mlp + ("up_proj",), cfg.intermediate_size, width,
            cfg.mlp_bias)
    _linear(table, f"{hf}.mlp.down_proj", mlp + ("down_proj",), width, cfg.intermediate_size,
            cfg.mlp_bias)
  return table


def _weight_map(cfg: EncoderConfig | DecoderConfig) -> dict[str, WeightSpec]:
  if isinstance(cfg, EncoderConfig):
    return encoder_weight_map(cfg)
  if isinstance(cfg, DecoderConfig):
    return decoder_weight_map(cfg)
  raise TypeError(f"Expected an EncoderConfig or DecoderConfig, got {type(cfg).__name__}.")


def to_hf_state_dict(cfg: EncoderConfig | DecoderConfig, params: Any) -> dict[str, np.ndarray]:
  """{HF tensor name: numpy array in HF layout ([out, in] Linear weights)} for either tower.

  Encoder names are `BertModel`'s (no `bert.` prefix, no pooler); decoder names are the causal LM's.
  """
  state = {}
  for hf_name, spec in _weight_map(cfg).items():
    leaf = params
    for key in spec.path:
      leaf = leaf[key]
    array = np.asarray(leaf)
    state[hf_name] = np.ascontiguousarray(array.T if spec.transpose else array)
  return state


def encoder_to_hf_state_dict(cfg: EncoderConfig, params: Any) -> dict[str, np.ndarray]:
  return to_hf_state_dict(cfg, params)


def decoder_to_hf_state_dict(cfg: DecoderConfig, params: Any) -> dict[str, np.ndarray]:
  return to_hf_state_dict(cfg, params)


# ----------------------------------------------------------------------------------------------
# Assembling a tree from named tensors, with one error for everything that does not fit.


def _listed(names: list[str]) -> str:
  shown = ", ".join(names[:MAX_LISTED])
  return shown + (f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _check_names_and_shapes(weight_map: dict[str, WeightSpec], found: dict[str, tuple[int, ...]],
                            source: pathlib.Path, what: str) -> None:
  """Raise one ValueError naming every missing, unexpected and mis-shaped tensor."""
  missing = [name for name in weight_map if name not in found]
  unexpected = [name for name in found if name not in weight_map]
  misshaped = [f"{name} {tuple(found[name])} (expected {weight_map[name].hf_shape})"
               for name in weight_map if name in found
               and tuple(found[name]) != weight_map[name].hf_shape]
  if not (missing or unexpected or misshaped):
    return
  lines = [f"The tensors in {source} do not fit the {what} its config describes:"]
  if missing:
    lines.append(f"  missing ({len(missing)}): {_listed(missing)}")
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}): {_listed(unexpected)}")
  if misshaped:
    lines.append(f"  mis-shaped ({len(misshaped)}): {_listed(misshaped)}")
  lines.append("Check that config.json belongs to these weights and that the model is a "
               f"supported {what}.")
  raise ValueError("\n".join(lines))


def _assemble(weight_map: dict[str, WeightSpec], read: Callable[[str], np.ndarray],
              dtype: Any) -> dict:
  """Our nested param dict, reading one tensor at a time so peak memory stays near one copy."""
  params: dict = {}
  for hf_name, spec in weight_map.items():
    array = read(hf_name).astype(dtype, copy=False)
    if spec.transpose:
      array = np.ascontiguousarray(array.T)
    node = params
    for key in spec.path[:-1]:
      node = node.setdefault(key, {})
    node[spec.path[-1]] = array
  return params


# ----------------------------------------------------------------------------------------------
# Safetensors folders.


def _existing(path: str | pathlib.Path, what: str) -> pathlib.Path:
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what} path {str(path)!r} does not exist.")
  return path


def _read_config(folder: pathlib.Path) -> dict:
  config_path = folder / CONFIG_FILE
  if not config_path.is_file():
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f" It holds {ggufs}: pass the .gguf file itself." if ggufs else ""
    raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; expected a Hugging Face model folder "
                            f"(config.json + model.safetensors).{hint}")
  with open(config_path) as f:
    return json.load(f)


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
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


class _SafetensorsCheckpoint:
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


def _renamed_keys(names: Iterable[str], rename: Callable[[str], str | None]) -> dict[str, str]:
  """{our HF name: name in the file} for names that `rename` keeps (None means skip)."""
  kept = {}
  for name in names:
    new_name = rename(name)
    if new_name is not None:
      kept[new_name] = name
  return kept


def _bert_renamer(names: list[str]) -> Callable[[str], str | None]:
  # BertForX saves the body under `bert.` and its task heads (cls.*, classifier.*) beside it.
  prefixed = any(name.startswith("bert.") for name in names)

  def rename(name: str) -> str | None:
    if prefixed:
      if not name.startswith("bert."):
        return None
      name = name[len("bert."):]
    # The position_ids buffer and the pooler are not part of the last hidden states.
    if name == "embeddings.position_ids" or name.startswith("pooler."):
      return None
    # Very old checkpoints name LayerNorm parameters gamma / beta.
    if name.endswith("LayerNorm.gamma"):
      name = name[:-len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
      name = name[:-len("beta")] + "bias"
    return name

  return rename


def _causal_lm_renamer(names: list[str], cfg: DecoderConfig) -> Callable[[str], str | None]:
  # A bare `LlamaModel` checkpoint has no `model.` prefix.
  bare = not any(name.startswith("model.") for name in names)

  def rename(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
      return None  # older checkpoints saved this buffer; it follows from the config
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      return None  # some tied checkpoints still save the (identical) head
    if bare and name != "lm_head.weight":
      name = "model." + name
    return name

  return rename


def _load_safetensors_tower(folder: pathlib.Path, weight_map: dict[str, WeightSpec],
                            renamer_for: Callable[[list[str]], Callable[[str], str | None]],
                            dtype: Any, what: str) -> dict:
  checkpoint = _SafetensorsCheckpoint(_safetensors_files(folder))
  file_shapes = checkpoint.shapes()
  names = _renamed_keys(file_shapes, renamer_for(list(file_shapes)))
  _check_names_and_shapes(weight_map, {ours: file_shapes[theirs] for ours, theirs in names.items()},
                          folder, what)
  return _assemble(weight_map, lambda name: checkpoint.read(names[name]), dtype)


def load_encoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, params) from an HF BERT-family folder: config.json + (sharded) safetensors.

  Accepts `BertModel` and `BertForX` checkpoints (`bert.` prefix); the pooler, task heads and the
  `position_ids` buffer are skipped. Arrays are numpy in `dtype`, Dense kernels [in, out].
  """
  folder = _existing(path, "Encoder")
  if folder.is_file():
    raise ValueError(f"Encoder path {str(folder)!r} is a file; pass the Hugging Face model folder "
                     "(config.json + model.safetensors). GGUF is read for decoders only.")
  cfg = encoder_config_from_hf(_read_config(folder), str(folder / CONFIG_FILE))
  params = _load_safetensors_tower(folder, encoder_weight_map(cfg), _bert_renamer,
                                   jnp.dtype(dtype), "BERT encoder")
  return cfg, params


def load_decoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, params) from an HF Llama / Mistral / Qwen2 folder or a llama.cpp `.gguf` file.

  GGUF tensors are dequantized to float32 (then cast to `dtype`). Arrays are numpy, kernels [in, out].
  """
  path = _existing(path, "Decoder")
  if path.is_file():
    if path.suffix != ".gguf":
      raise ValueError(f"Decoder path {str(path)!r} is a file but not a .gguf; pass a Hugging Face "
                       "model folder (config.json + model.safetensors) or a .gguf file.")
    return _load_gguf_decoder(path, jnp.dtype(dtype))
  cfg = decoder_config_from_hf(_read_config(path), str(path / CONFIG_FILE))
  params = _load_safetensors_tower(path, decoder_weight_map(cfg),
                                   lambda names: _causal_lm_renamer(names, cfg),
                                   jnp.dtype(dtype), f"{cfg.model_type} decoder")
  return cfg, params


# ----------------------------------------------------------------------------------------------
# GGUF files (llama.cpp).


@functools.lru_cache(maxsize=4)
def _gguf_reader_cached(path: str, mtime_ns: int):
  del mtime_ns  # part of the cache key only, so a rewritten file is read again
  import gguf
  return gguf.GGUFReader(path)


def gguf_reader(path: str | pathlib.Path):
  """A `gguf.GGUFReader` for `path`, shared by load_decoder and load_tokenizer (reading is slow)."""
  path = _existing(path, "GGUF")
  return _gguf_reader_cached(str(path.resolve()), path.stat().st_mtime_ns)


def gguf_metadata(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                      "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name_from_gguf(name: str) -> str | None:
  """The HF causal-LM name of GGUF tensor `name`, or None when it has none."""
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
  return None


def gguf_name_from_hf(name: str) -> str:
  """The GGUF name of HF causal-LM tensor `name` (the inverse of hf_name_from_gguf)."""
  for gguf_name, hf_name in _GGUF_GLOBAL_NAMES.items():
    if hf_name == name:
      return gguf_name
  parts = name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"]:
    for gguf_rest, hf_rest in _GGUF_LAYER_NAMES.items():
      if hf_rest == parts[3]:
        return f"blk.{parts[2]}.{gguf_rest}"
  raise ValueError(f"HF tensor {name!r} has no GGUF name.")


def llama_cpp_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (convert_hf_to_gguf.py applies it to Llama q/k weights and biases).

  HF rotate-half RoPE pairs row j with row j + head_dim/2 of a head; llama.cpp pairs rows 2j, 2j+1.
  """
  rows = weight.shape[0]
  return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_rope_unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """The inverse of llama_cpp_rope_permute: GGUF q/k rows back into HF order."""
  rows = weight.shape[0]
  return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def decoder_config_from_gguf(reader, source: str = "GGUF") -> DecoderConfig:
  """DecoderConfig from GGUF metadata (`{arch}.*` keys and `tokenizer.ggml.*` special ids)."""
  arch = gguf_metadata(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                     f"{list(GGUF_ARCHITECTURES)}.")

  def meta(key: str, default: Any = None) -> Any:
    value = gguf_metadata(reader, f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}, which the model needs.")
    return value

  hidden_size, num_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
  tensor_names = {t.name for t in reader.tensors}
  vocab_size = gguf_metadata(reader, f"{arch}.vocab_size")
  if vocab_size is None:
    vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
  scaling_type = gguf_metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling_type not in ("none", "linear"):
    raise ValueError(f"{source}: GGUF rope scaling {scaling_type!r} is not supported; supported: "
                     "none, linear. Load the original HF folder instead.")
  if "rope_freqs.weight" in tensor_names:
    raise ValueError(f"{source}: GGUF carries rope_freqs.weight (Llama 3.1-style rope scaling), "
                     "which is not read from GGUF; load the original HF folder instead.")
  rope_type, rope_params = "default", ()
  if scaling_type == "linear":
    rope_type, rope_params = "linear", (("factor", float(meta("rope.scaling.factor"))),)
  sliding_window = gguf_metadata(reader, f"{arch}.attention.sliding_window")
  return DecoderConfig(
      vocab_size=int(vocab_size),
      hidden_size=hidden_size,
      intermediate_size=int(meta("feed_forward_length")),
      num_layers=int(meta("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
      head_dim=int(meta("attention.key_length", hidden_size // num_heads)),
      # GGUF stores float32; its shortest decimal form is the value config.json held (1e-05).
      rms_norm_eps=float(str(np.float32(meta("attention.layer_norm_rms_epsilon")))),
      rope_theta=float(meta("rope.freq_base", 10000.0)),
      rope_type=rope_type,
      rope_params=rope_params,
      max_position_embeddings=int(meta("context_length", 2048)),
      tie_word_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      o_bias="blk.0.attn_output.bias" in tensor_names,
      sliding_window=None if sliding_window is None else int(sliding_window),
      bos_token_id=_first_id(gguf_metadata(reader, "tokenizer.ggml.bos_token_id")),
      eos_token_id=_first_id(gguf_metadata(reader, "tokenizer.ggml.eos_token_id")),
      pad_token_id=_first_id(gguf_metadata(reader, "tokenizer.ggml.padding_token_id")),
      model_type=arch)


def _load_gguf_decoder(path: pathlib.Path, dtype: np.dtype) -> tuple[DecoderConfig, dict]:
  import gguf
  reader = gguf_reader(path)
  cfg = decoder_config_from_gguf(reader, str(path))
  weight_map = decoder_weight_map(cfg)
  tensors, unknown = {}, []
  for tensor in reader.tensors:
    hf_name = hf_name_from_gguf(tensor.name)
    if hf_name is None:
      unknown.append(tensor.name)
    else:
      tensors[hf_name] = tensor
  # GGUF lists dims fastest-first; numpy (and HF) order is the reverse.
  found = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
  found.update({name: () for name in unknown})
  _check_names_and_shapes(weight_map, found, path, f"{cfg.model_type} decoder")

  def read(hf_name: str) -> np.ndarray:
    tensor = tensors[hf_name]
    shape = tuple(int(d) for d in reversed(tensor.shape))
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    # Only Llama conversion permutes q/k rows (for llama.cpp's interleaved RoPE); Qwen2's does not.
    if cfg.model_type == "llama" and ".self_attn.q_proj." in hf_name:
      array = llama_cpp_rope_unpermute(array, cfg.num_heads)
    elif cfg.model_type == "llama" and ".self_attn.k_proj." in hf_name:
      array = llama_cpp_rope_unpermute(array, cfg.num_kv_heads)
    return array

  return cfg, _assemble(weight_map, read, dtype)


# ----------------------------------------------------------------------------------------------
# Tokenizers.

GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer splits for GGUF `tokenizer.ggml.pre` values whose merges were learned on them;
# anything else gets GPT-2's byte-level split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                             "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
                             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


@functools.lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
  """GPT-2's byte → printable character table, which byte-level BPE vocabularies are written in."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = list(printable), 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in chars)))


def _gguf_tokenizer(path: pathlib.Path):
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  reader = gguf_reader(path)
  kind = gguf_metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported; only byte-level BPE "
                     "('gpt2': Llama 3, Qwen2, SmolLM2) is. Use the original HF folder's tokenizer.")
  tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
  merges = gguf_metadata(reader, "tokenizer.ggml.merges") or []
  token_types = gguf_metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  # Some files store a token as raw text rather than in the byte alphabet; respell those.
  vocab = {token if set(token) <= alphabet
           else "".join(spelling[b] for b in token.encode("utf-8")): i
           for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                   fuse_unk=False))
  split = GGUF_PRE_TOKENIZER_SPLITS.get(gguf_metadata(reader, "tokenizer.ggml.pre"))
  if split is None:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()

  def token_at(key: str) -> str | None:
    index = gguf_metadata(reader, f"tokenizer.ggml.{key}")
    return None if index is None else tokens[int(index)]

  named = {"bos_token": token_at("bos_token_id"), "eos_token": token_at("eos_token_id"),
           "unk_token": token_at("unknown_token_id"), "pad_token": token_at("padding_token_id")}
  # Control tokens (<|im_start|>, <|endoftext|>, ...) must stay whole and be skippable on decode.
  # One written outside the byte alphabet is a llama.cpp mislabel of an ordinary token: left out.
  control = [token for token, kind in zip(tokens, token_types)
             if kind == GGUF_TOKEN_TYPE_CONTROL and set(token) <= alphabet]
  special = [AddedToken(t, special=True, normalized=False)
             for t in dict.fromkeys(control + [t for t in named.values() if t is not None])]
  tokenizer.add_special_tokens(special)
  user_defined = [token for token, kind in zip(tokens, token_types)
                  if kind == GGUF_TOKEN_TYPE_USER_DEFINED and token in vocab]
  if user_defined:
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
  bos = named["bos_token"]
  if gguf_metadata(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
    bos_id = vocab.get(bos, tokens.index(bos))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
  wrapped = PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, chat_template=gguf_metadata(reader, "tokenizer.chat_template"),
      clean_up_tokenization_spaces=False,
      **{name: token for name, token in named.items() if token is not None})
  # Registered on the wrapper too, so all_special_tokens and skip_special_tokens know them.
  wrapped.add_special_tokens({"additional_special_tokens": special},
                             replace_extra_special_tokens=False)
  return wrapped


def load_tokenizer(path: str | pathlib.Path):
  """The tokenizer of an HF folder (AutoTokenizer, local files only) or of a `.gguf` file."""
  path = _existing(path, "Tokenizer")
  if path.is_file():
    if path.suffix != ".gguf":
      raise ValueError(f"Tokenizer path {str(path)!r} is a file but not a .gguf; pass a Hugging "
                       "Face model folder or a .gguf file.")
    return _gguf_tokenizer(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
