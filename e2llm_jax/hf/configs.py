"""HF `config.json` dicts ↔ our EncoderConfig / DecoderConfig, both ways.

Covers BERT-family encoders and Llama / Mistral / Qwen2 decoders, old and transformers-5 config formats.
"""

from typing import Any

from e2llm_jax.errors import WeightsError
from e2llm_jax.models.bert import EncoderConfig
from e2llm_jax.models.llama import ROPE_TYPES, DecoderConfig

ENCODER_MODEL_TYPES = ("bert",)
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")
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


def _require(hf_config: dict, key: str, source: str) -> Any:
  if hf_config.get(key) is None:
    raise WeightsError(f"{source} lacks {key!r}, which the model needs.")
  return hf_config[key]


def first_id(value: Any) -> int | None:
  # Several HF configs list more than one eos id; generation stops on the first, which is enough here.
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def encoder_config_from_hf(hf_config: dict, source: str = "config.json") -> EncoderConfig:
  """EncoderConfig from a BERT-family `config.json` dict (model_type `bert`)."""
  model_type = hf_config.get("model_type")
  if model_type not in ENCODER_MODEL_TYPES:
    raise WeightsError(f"{source}: encoder model_type {model_type!r} is not supported; supported: "
                       f"{list(ENCODER_MODEL_TYPES)} (BERT-family models such as MiniLM, GTE, BGE, "
                       "E5).")
  position_type = hf_config.get("position_embedding_type") or "absolute"
  if position_type != "absolute":
    raise WeightsError(f"{source}: position_embedding_type {position_type!r} is not supported; "
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
    raise WeightsError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                       f"{list(ROPE_TYPES)}.")
  missing = [name for name in ROPE_PARAM_NAMES[rope_type] if scaling.get(name) is None]
  if missing:
    raise WeightsError(f"{source}: rope type {rope_type!r} needs {missing} in its rope settings.")
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
    raise WeightsError(f"{source}: Qwen2 with sliding attention on only some layers "
                       "(max_window_layers / layer_types) is not supported; the decoder applies "
                       "one window to every layer.")
  return int(_require(hf_config, "sliding_window", source))


def decoder_config_from_hf(hf_config: dict, source: str = "config.json") -> DecoderConfig:
  """DecoderConfig from a Llama / Mistral / Qwen2 `config.json` dict (old or transformers-5 format)."""
  model_type = hf_config.get("model_type")
  if model_type not in DECODER_MODEL_TYPES:
    raise WeightsError(f"{source}: decoder model_type {model_type!r} is not supported; supported: "
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
      bos_token_id=first_id(hf_config.get("bos_token_id")),
      eos_token_id=first_id(hf_config.get("eos_token_id")),
      pad_token_id=first_id(hf_config.get("pad_token_id")),
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
