"""Tokenizers: an HF folder's (AutoTokenizer, offline) or a GGUF file's, rebuilt as a fast HF tokenizer.

The GGUF path supports byte-level BPE (Llama 3, Qwen2, SmolLM2), with its control tokens and chat template.
"""

import functools
import pathlib

from e2llm_jax.errors import WeightsError
from e2llm_jax.hf.gguf import gguf_metadata, gguf_reader
from e2llm_jax.hf.safetensors_io import folder_or_gguf


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
def byte_spelling() -> dict[int, str]:
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


def gguf_tokenizer(path: pathlib.Path):
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  reader = gguf_reader(path)
  kind = gguf_metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise WeightsError(f"{path}: GGUF tokenizer model {kind!r} is not supported; only byte-level "
                       "BPE ('gpt2': Llama 3, Qwen2, SmolLM2) is. Use the original HF folder's "
                       "tokenizer.")
  tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
  merges = gguf_metadata(reader, "tokenizer.ggml.merges") or []
  token_types = gguf_metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  spelling = byte_spelling()
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
  path = folder_or_gguf(path, "Tokenizer")
  if path.is_file():
    return gguf_tokenizer(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
