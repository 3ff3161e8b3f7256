"""The import entry points per tower: an HF folder or a llama.cpp GGUF file → (config, params).

Dispatches to safetensors_io or gguf; arrays come back as numpy, Dense kernels [in, out].
"""

import pathlib
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from e2llm_jax.errors import WeightsError
from e2llm_jax.hf.configs import decoder_config_from_hf, encoder_config_from_hf
from e2llm_jax.hf.gguf import gguf_tensor_reader
from e2llm_jax.hf.safetensors_io import (CONFIG_FILE, existing_path, folder_or_gguf,
                                         read_config, safetensors_tensor_reader)
from e2llm_jax.hf.weight_names import (assemble, bert_renamer, causal_lm_renamer,
                                       decoder_weight_map, encoder_weight_map)
from e2llm_jax.models.bert import EncoderConfig
from e2llm_jax.models.llama import DecoderConfig


def encoder_tensor_reader(path: str | pathlib.Path
                          ) -> tuple[EncoderConfig, Callable[[str], np.ndarray]]:
  """(EncoderConfig, read): `read(hf_name)` gives one `BertModel` tensor in HF layout, as stored."""
  folder = existing_path(path, "Encoder")
  if folder.is_file():
    raise WeightsError(f"Encoder path {str(folder)!r} is a file; pass the Hugging Face model "
                       "folder (config.json + model.safetensors). GGUF is read for decoders only.")
  cfg = encoder_config_from_hf(read_config(folder), str(folder / CONFIG_FILE))
  return cfg, safetensors_tensor_reader(folder, encoder_weight_map(cfg), bert_renamer,
                                        "BERT encoder")


def decoder_tensor_reader(path: str | pathlib.Path
                          ) -> tuple[DecoderConfig, Callable[[str], np.ndarray]]:
  """(DecoderConfig, read): `read(hf_name)` gives one causal-LM tensor in HF layout (GGUF: float32)."""
  path = folder_or_gguf(path, "Decoder", "model folder (config.json + model.safetensors)")
  if path.is_file():
    return gguf_tensor_reader(path)
  cfg = decoder_config_from_hf(read_config(path), str(path / CONFIG_FILE))
  return cfg, safetensors_tensor_reader(path, decoder_weight_map(cfg),
                                        lambda names: causal_lm_renamer(names, cfg),
                                        f"{cfg.model_type} decoder")


def load_encoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, params) from an HF BERT-family folder: config.json + (sharded) safetensors.

  Accepts `BertModel` and `BertForX` checkpoints (`bert.` prefix); the pooler, task heads and the
  `position_ids` buffer are skipped. Arrays are numpy in `dtype`, Dense kernels [in, out], layers
  stacked as `cfg.scan_layers` says.
  """
  cfg, read = encoder_tensor_reader(path)
  return cfg, assemble(encoder_weight_map(cfg), read, jnp.dtype(dtype),
                      cfg.num_layers if cfg.scan_layers else None)


def load_decoder(path: str | pathlib.Path, dtype: Any = "float32") -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, params) from an HF Llama / Mistral / Qwen2 folder or a llama.cpp `.gguf` file.

  GGUF tensors are dequantized to float32 (then cast to `dtype`). Arrays are numpy, kernels [in, out],
  layers stacked as `cfg.scan_layers` says.
  """
  cfg, read = decoder_tensor_reader(path)
  return cfg, assemble(decoder_weight_map(cfg), read, jnp.dtype(dtype),
                      cfg.num_layers if cfg.scan_layers else None)
