"""llama.cpp GGUF files: the shared reader, metadata → DecoderConfig, and the decoder's tensors.

Tensors are dequantized to float32; Llama q/k rows are unpermuted back into HF order.
"""

import functools
import pathlib
from typing import Any, Callable

import numpy as np

from e2llm_jax.errors import WeightsError
from e2llm_jax.hf.configs import first_id
from e2llm_jax.hf.safetensors_io import existing_path
from e2llm_jax.hf.weight_names import (check_names_and_shapes, decoder_weight_map,
                                       hf_name_from_gguf, llama_cpp_rope_unpermute)
from e2llm_jax.models.llama import DecoderConfig

GGUF_ARCHITECTURES = ("llama", "qwen2")


@functools.lru_cache(maxsize=4)
def _gguf_reader_cached(path: str, mtime_ns: int):
  del mtime_ns  # part of the cache key only, so a rewritten file is read again
  import gguf
  return gguf.GGUFReader(path)


def gguf_reader(path: str | pathlib.Path):
  """A `gguf.GGUFReader` for `path`, shared by load_decoder and load_tokenizer (reading is slow)."""
  path = existing_path(path, "GGUF")
  return _gguf_reader_cached(str(path.resolve()), path.stat().st_mtime_ns)


def gguf_metadata(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def decoder_config_from_gguf(reader, source: str = "GGUF") -> DecoderConfig:
  """DecoderConfig from GGUF metadata (`{arch}.*` keys and `tokenizer.ggml.*` special ids)."""
  arch = gguf_metadata(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise WeightsError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                       f"{list(GGUF_ARCHITECTURES)}.")

  def meta(key: str, default: Any = None) -> Any:
    value = gguf_metadata(reader, f"{arch}.{key}", default)
    if value is None:
      raise WeightsError(f"{source}: GGUF metadata lacks {arch}.{key}, which the model needs.")
    return value

  hidden_size, num_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
  tensor_names = {t.name for t in reader.tensors}
  vocab_size = gguf_metadata(reader, f"{arch}.vocab_size")
  if vocab_size is None:
    vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
  scaling_type = gguf_metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling_type not in ("none", "linear"):
    raise WeightsError(f"{source}: GGUF rope scaling {scaling_type!r} is not supported; supported: "
                       "none, linear. Load the original HF folder instead.")
  if "rope_freqs.weight" in tensor_names:
    raise WeightsError(f"{source}: GGUF carries rope_freqs.weight (Llama 3.1-style rope scaling), "
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
      bos_token_id=first_id(gguf_metadata(reader, "tokenizer.ggml.bos_token_id")),
      eos_token_id=first_id(gguf_metadata(reader, "tokenizer.ggml.eos_token_id")),
      pad_token_id=first_id(gguf_metadata(reader, "tokenizer.ggml.padding_token_id")),
      model_type=arch)


def gguf_tensor_reader(path: pathlib.Path) -> tuple[DecoderConfig, Callable[[str], np.ndarray]]:
  """(DecoderConfig, read): `read(hf_name)` dequantizes one tensor into HF layout (float32)."""
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
  check_names_and_shapes(weight_map, found, path, f"{cfg.model_type} decoder")

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

  return cfg, read
