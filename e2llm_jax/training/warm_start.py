"""The adapter's least-squares warm start (`train.adapter_warm_start`, pooling `tokens`): before step 1,
each encoder token state is fitted to the decoder's embedding of the same characters.

Why: trained from a random start, the map into the decoder's embedding space was not found in 1,600
reconstruction examples (the soft tokens were silenced instead, artifacts/demo/README.md). A linear
fit on aligned tokens gives a channel the untrained decoder already half reads, and training refines it.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from e2llm_jax import errors
from e2llm_jax.data import builders, chunking
from e2llm_jax.models import bert, e2llm, llama

ENCODE_BATCH = 64  # chunks per encoder call
RIDGE = 1e-2  # ridge penalty per fitted token: keeps rare directions from blowing up


def chunk_texts(data: Any, count: int) -> list[str]:
  """`count` chunk texts of the pipeline's reconstruction sources (its tasks when none are named),
  record after record, taking the sources in turn."""
  names = list(data.recon_sources) or [n for n in data.task_names if n in data.sources]
  texts: list[str] = []
  for index in range(max(len(data.sources[n]) for n in names)):
    for name in names:
      if index < len(data.sources[name]):
        context = builders.decode_record(data.sources[name][index], require_answer=False)["context"]
        texts.extend(t for t in data.encoder.chunker(context).texts if t.strip())
      if len(texts) >= count:
        return texts[:count]
  return texts


def aligned_tokens(text: str, encoder_tokenizer: Any, decoder_tokenizer: Any, text_budget: int,
                   split_digits: bool) -> tuple[list[int], list[int]]:
  """Encoder ids of `text` (at most `text_budget`) and, for each, the decoder token it stands for:
  the first one starting inside its characters, else the one it lies in."""
  encoder_ids, encoder_spans = chunking.tokenize_with_offsets(encoder_tokenizer, text, split_digits)
  decoder_ids, decoder_spans = chunking.tokenize_with_offsets(decoder_tokenizer, text)
  if not decoder_ids:
    return [], []
  # Where each decoder token's text starts, past the space a BPE token carries in front; tokens of
  # only whitespace (SmolLM2 writes ": 5" as ":", " ", "5") stand for nothing.
  starts = np.asarray([a + len(text[a:b]) - len(text[a:b].lstrip()) if text[a:b].strip() else -1
                       for a, b in decoder_spans])
  encoder_ids, targets = list(encoder_ids[:text_budget]), []
  for start, end in encoder_spans[:text_budget]:
    inside = np.flatnonzero((starts >= start) & (starts < end))
    index = inside[0] if len(inside) else max(np.searchsorted(decoder_spans[:, 0], start, "right") - 1, 0)
    targets.append(int(decoder_ids[index]))
  return encoder_ids, targets


def token_states(model: e2llm.E2LLMConfig, frozen: Any, chunker: chunking.Chunker,
                 id_lists: list[list[int]]) -> Iterator[np.ndarray]:
  """Each chunk's last hidden states at its text tokens [n_i, De] (base encoder, no LoRA)."""
  head, tail = chunker.head_ids, chunker.tail_ids
  pad = int(chunker.tokenizer.pad_token_id or 0)
  for first in range(0, len(id_lists), ENCODE_BATCH):
    part = [head + ids + tail for ids in id_lists[first:first + ENCODE_BATCH]]
    padded = chunking.pad_chunks(part, len(part), chunker.chunk_tokens, pad)
    hidden = np.asarray(bert.encode(model.encoder, frozen["encoder"], jnp.asarray(padded.ids),
                                    jnp.asarray(padded.token_mask)), np.float32)
    for row, ids in enumerate(id_lists[first:first + ENCODE_BATCH]):
      yield hidden[row, len(head):len(head) + len(ids)]


def fit_linear(states: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ridge regression `targets ≈ states @ weight + bias`: (weight [De, Dd], bias [Dd])."""
  inputs = np.concatenate([states, np.ones((len(states), 1), states.dtype)], axis=1)
  gram = inputs.T.astype(np.float64) @ inputs + RIDGE * len(states) * np.eye(inputs.shape[1])
  solved = np.linalg.solve(gram, inputs.T.astype(np.float64) @ targets)
  return solved[:-1].astype(np.float32), solved[-1].astype(np.float32)


def linear_adapter(weight: np.ndarray, bias: np.ndarray, hidden_size: int) -> dict:
  """Adapter params (fc1 → exact GELU → fc2) that compute `x @ weight + bias` exactly.

  gelu(x) - gelu(-x) = x, so fc1 = [I, -I] and fc2 = [weight; -weight] (the rest zero)."""
  width, out = weight.shape
  if hidden_size < 2 * width:
    raise errors.ConfigError(
        f"train.adapter_warm_start writes a linear map through the adapter's GELU, "
        f"which needs model.adapter_hidden >= 2 x the encoder width ({2 * width}); "
        f"it is {hidden_size}. Raise it.")
  fc1 = np.zeros((width, hidden_size), np.float32)
  fc1[:, :width], fc1[:, width:2 * width] = np.eye(width), -np.eye(width)
  fc2 = np.zeros((hidden_size, out), np.float32)
  fc2[:width], fc2[width:2 * width] = weight, -weight
  return {"fc1": {"kernel": fc1, "bias": np.zeros((hidden_size,), np.float32)},
          "fc2": {"kernel": fc2, "bias": bias}}


def warm_start_adapter(model: e2llm.E2LLMConfig, frozen: Any, data: Any, count: int
                       ) -> tuple[dict, dict]:
  """Adapter params fitted on `count` chunk texts of `data` (a text `pipeline.Pipeline`), and
  {"tokens": fitted pairs, "nearest_token_accuracy": share of fitted vectors nearest their target}."""
  if not hasattr(data, "encoder"):
    raise errors.ConfigError(
        "train.adapter_warm_start fits text to the decoder's embeddings, so it needs pretrained "
        "towers with tokenizers and text tasks; set it to 0 for this run.")
  chunker = data.encoder.chunker
  decoder_tokenizer = data.encoder.decoder_tokenizer
  id_lists, target_lists = [], []
  for text in chunk_texts(data, count):
    ids, targets = aligned_tokens(text, chunker.tokenizer, decoder_tokenizer, chunker.text_budget,
                                  chunker.split_digits)
    if ids:
      id_lists.append(ids)
      target_lists.append(targets)
  if not id_lists:
    raise errors.DataError(
        "train.adapter_warm_start found no text in the training sources to fit on; name text "
        "sources in data.tasks or data.recon_sources.")
  states = np.concatenate(list(token_states(model, frozen, chunker, id_lists)))
  target_ids = np.concatenate(target_lists)
  table = np.asarray(llama.embed(model.decoder, frozen["decoder"],
                                 jnp.arange(model.decoder.vocab_size)[None])[0], np.float32)
  weight, bias = fit_linear(states, table[target_ids])
  unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-6)
  nearest = np.concatenate([np.argmax((part @ weight + bias) @ unit.T, axis=1)
                            for part in np.array_split(states, max(len(states) // 1024, 1))])
  report = {"tokens": int(len(states)),
            "nearest_token_accuracy": float(np.mean(nearest == target_ids))}
  return linear_adapter(weight, bias, model.adapter_module().hidden_size), report


def apply(setup: Any, data: Any, count: int) -> dict:
  """Replace `setup`'s adapter by the fitted one (on the adapter's shardings); returns the report."""
  params, report = warm_start_adapter(setup.model, setup.frozen, data, count)
  trainable = setup.state["trainable"]
  shardings = setup.state_shardings["trainable"]["adapter"]
  adapter = jax.tree.map(lambda new, old, where: jax.device_put(new.astype(old.dtype), where),
                         params, trainable["adapter"], shardings)
  setup.state = {**setup.state, "trainable": {**trainable, "adapter": adapter}}
  return report
