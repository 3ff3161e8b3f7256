"""A compressed context: the soft tokens of a text's chunks, with the chunk texts and their spans.

Saved as a folder: `soft_tokens.safetensors` (arrays) and `context.json` (texts and metadata); never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from safetensors.numpy import load_file, save_file

from e2llm_jax import errors

ARRAYS_FILE = "soft_tokens.safetensors"
METADATA_FILE = "context.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class SoftContext:
  """Soft tokens [num_chunks · tokens_per_chunk, D] (float32) of one context, for any question."""
  soft_tokens: np.ndarray
  chunk_mask: np.ndarray          # [num_chunks] int32, 1 for every chunk the soft tokens hold
  chunk_texts: list[str]
  chunk_spans: list[tuple[int, int]]  # character [start, end) of each chunk in the context
  num_context_tokens: int         # the context's length in decoder tokens
  tokens_per_chunk: int
  # [num_chunks · tokens_per_chunk] int32, 1 at the soft tokens the decoder reads (pooling `tokens`
  # hides special and padding slots); None: all of them.
  slot_mask: np.ndarray | None = None

  def __post_init__(self):
    self.soft_tokens = np.asarray(self.soft_tokens, np.float32)
    self.chunk_mask = np.asarray(self.chunk_mask, np.int32)
    self.slot_mask = np.ones((self.soft_tokens.shape[0],), np.int32) if self.slot_mask is None \
        else np.asarray(self.slot_mask, np.int32)
    self.chunk_spans = [(int(a), int(b)) for a, b in self.chunk_spans]
    expected = len(self.chunk_texts) * self.tokens_per_chunk
    if self.soft_tokens.ndim != 2 or self.soft_tokens.shape[0] != expected:
      raise ValueError(f"soft_tokens has shape {self.soft_tokens.shape}; {len(self.chunk_texts)} "
                       f"chunks of {self.tokens_per_chunk} soft tokens need [{expected}, D].")
    if self.chunk_mask.shape != (len(self.chunk_texts),) or len(self.chunk_spans) != len(
        self.chunk_texts):
      raise ValueError("chunk_mask, chunk_texts and chunk_spans must have one entry per chunk.")

  @property
  def num_chunks(self) -> int:
    return len(self.chunk_texts)

  @property
  def num_soft_tokens(self) -> int:
    return int(self.slot_mask.sum())

  @property
  def visible_soft_tokens(self) -> np.ndarray:
    """[num_soft_tokens, D]: the soft tokens the decoder reads, in order."""
    return self.soft_tokens[self.slot_mask == 1]

  @property
  def compression_ratio(self) -> float:
    """Context decoder tokens per soft token."""
    return self.num_context_tokens / max(self.num_soft_tokens, 1)

  def save(self, path: str | pathlib.Path) -> pathlib.Path:
    """Write the folder `path` (created if needed); returns it."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"soft_tokens": self.soft_tokens, "chunk_mask": self.chunk_mask,
               "slot_mask": self.slot_mask},
              str(folder / ARRAYS_FILE))
    metadata = {"format_version": FORMAT_VERSION, "chunk_texts": self.chunk_texts,
                "chunk_spans": [list(s) for s in self.chunk_spans],
                "num_context_tokens": int(self.num_context_tokens),
                "tokens_per_chunk": int(self.tokens_per_chunk)}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, ensure_ascii=False) + "\n")
    return folder

  @classmethod
  def load(cls, path: str | pathlib.Path) -> SoftContext:
    """Read a folder written by `save`."""
    folder = pathlib.Path(path)
    missing = [name for name in (ARRAYS_FILE, METADATA_FILE) if not (folder / name).is_file()]
    if missing:
      raise FileNotFoundError(f"{str(folder)!r} is not a saved SoftContext (missing {missing}); "
                              "write one with SoftContext.save(path).")
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
      raise errors.UserError(f"{str(folder)!r} holds SoftContext format "
                       f"{metadata.get('format_version')!r}; this version reads {FORMAT_VERSION}.")
    arrays = load_file(str(folder / ARRAYS_FILE))
    return cls(soft_tokens=arrays["soft_tokens"], chunk_mask=arrays["chunk_mask"],
               chunk_texts=list(metadata["chunk_texts"]),
               chunk_spans=[tuple(s) for s in metadata["chunk_spans"]],
               num_context_tokens=int(metadata["num_context_tokens"]),
               tokens_per_chunk=int(metadata["tokens_per_chunk"]),
               slot_mask=arrays.get("slot_mask"))
