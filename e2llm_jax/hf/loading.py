"""The import entry points per tower: an HF folder or a llama.cpp GGUF file → (config, params).

Dispatches to safetensors_io or gguf; arrays come back as numpy, Dense kernels [in, out].
"""

import pathlib
from typing import Any

import jax.numpy as jnp

from e2llm_jax.hf.configs import decoder_config_from_hf, encoder_config_from_hf
from e2llm_jax.hf.gguf import load_gguf_decoder
from e2llm_jax.hf.safetensors_io import (CONFIG_FILE, existing_path, load_safetensors_tower,
                                         read_config)
from e2llm_jax.hf.weight_names import (bert_renamer, causal_lm_renamer, decoder_weight_map,
                                       encoder_weight_map)
from e2llm_jax.models.bert import EncoderConfig
from e2llm_jax.models.llama import DecoderConfig


def load_encoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, params) from an HF BERT-family folder: config.json + (sharded) safetensors.

  Accepts `BertModel` and `BertForX` checkpoints (`bert.` prefix); the pooler, task heads and the
  `position_ids` buffer are skipped. Arrays are numpy in `dtype`, Dense kernels [in, out].
  """
  folder = existing_path(path, "Encoder")
  if folder.is_file():
    raise ValueError(f"Encoder path {str(folder)!r} is a file; pass the Hugging Face model folder "
                     "(config.json + model.safetensors). GGUF is read for decoders only.")
  cfg = encoder_config_from_hf(read_config(folder), str(folder / CONFIG_FILE))
  params = load_safetensors_tower(folder, encoder_weight_map(cfg), bert_renamer,
                                   jnp.dtype(dtype), "BERT encoder")
  return cfg, params


def load_decoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, params) from an HF Llama / Mistral / Qwen2 folder or a llama.cpp `.gguf` file.

  GGUF tensors are dequantized to float32 (then cast to `dtype`). Arrays are numpy, kernels [in, out].
  """
  path = existing_path(path, "Decoder")
  if path.is_file():
    if path.suffix != ".gguf":
      raise ValueError(f"Decoder path {str(path)!r} is a file but not a .gguf; pass a Hugging Face "
                       "model folder (config.json + model.safetensors) or a .gguf file.")
    return load_gguf_decoder(path, jnp.dtype(dtype))
  cfg = decoder_config_from_hf(read_config(path), str(path / CONFIG_FILE))
  params = load_safetensors_tower(path, decoder_weight_map(cfg),
                                   lambda names: causal_lm_renamer(names, cfg),
                                   jnp.dtype(dtype), f"{cfg.model_type} decoder")
  return cfg, params
