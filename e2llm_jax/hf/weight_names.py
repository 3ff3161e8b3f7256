"""HF tensor names ↔ where each tensor lives in our tower trees, both ways; GGUF names and q/k permutations.

Also assembles a tree from named tensors, with one error naming everything that does not fit.
"""

import pathlib
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from e2llm_jax.errors import WeightsError
from e2llm_jax.models import stacking
from e2llm_jax.models.bert import EncoderConfig
from e2llm_jax.models.llama import DecoderConfig

# How many names per problem kind an import error lists before it only counts the rest.
MAX_LISTED = 40

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
  `params` may be stacked (scanned layers) or per layer.
  """
  state = {}
  for hf_name, spec in _weight_map(cfg).items():
    array = np.asarray(stacking.lookup(params, spec.path))
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


def check_names_and_shapes(weight_map: dict[str, WeightSpec], found: dict[str, tuple[int, ...]],
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
  raise WeightsError("\n".join(lines))


def assemble(weight_map: dict[str, WeightSpec], read: Callable[[str], np.ndarray],
             dtype: Any, num_layers: int | None = None) -> dict:
  """Our nested param dict, reading one tensor at a time so peak memory stays near one copy.

  With `num_layers` (a scanned tower) each layer's tensor is copied straight into its slot of a
  [num_layers, ...] array: stacking per-layer arrays afterwards held both layouts at once and
  raised SmolLM2's loading peak by 400 MB (bench/RESULTS.md).
  """
  params: dict = {}
  for hf_name, spec in weight_map.items():
    array = read(hf_name).astype(dtype, copy=False)
    if spec.transpose:
      array = array.T
    slot = stacking.stacked_slot(spec.path) if num_layers else None
    path = spec.path if slot is None else slot[0]
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    if slot is None:
      node[path[-1]] = np.ascontiguousarray(array)
    else:
      if path[-1] not in node:
        node[path[-1]] = np.empty((num_layers,) + array.shape, array.dtype)
      node[path[-1]][slot[1]] = array
  return params


# ----------------------------------------------------------------------------------------------
# Renaming the tensors a checkpoint file holds to the names the maps use.


def renamed_keys(names: Iterable[str], rename: Callable[[str], str | None]) -> dict[str, str]:
  """{our HF name: name in the file} for names that `rename` keeps (None means skip)."""
  kept = {}
  for name in names:
    new_name = rename(name)
    if new_name is not None:
      kept[new_name] = name
  return kept


def bert_renamer(names: list[str]) -> Callable[[str], str | None]:
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


def causal_lm_renamer(names: list[str], cfg: DecoderConfig) -> Callable[[str], str | None]:
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


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp) names and its q/k row order.


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
