"""On-device decoding: a jitted prefill fills the KV cache, a `lax.while_loop` picks every new token.

Greedy at temperature 0, else temperature / top-k / top-p sampling keyed per row; stops on EOS, stop ids or the limit.

Prompt layout. Row `b` is its whole prompt left-padded to `L` slots: `ids [B,L]` (decoder ids, pad
where a slot is not text), `soft_index [B,L]` (the slot's row in `soft [B,S,D]`, -1 for text) and
`mask [B,L]`. So the last slot of every row is real, the first new token is predicted there, and
rows of any lengths batch together: positions count real slots only (see `llama.decoder_step`).
"""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from e2llm_jax import errors
from e2llm_jax.models import e2llm, llama

MAX_STOP_SEQUENCES = 8  # stop sequences checked on device (the host trims at every stop string)
MAX_STOP_TOKENS = 16    # ids per stop sequence checked on device (its last ones)
MAX_EOS_IDS = 4
UNUSED_ID = -1          # an empty entry of the stop and EOS tables
LINEAR_BUCKET_STEP = 1024  # buckets grow by powers of two up to here, then by this step


class PromptRow(NamedTuple):
  """One prompt: decoder ids, then soft tokens [n, D] (or none), then decoder ids."""
  before: list[int]
  soft: np.ndarray | None
  after: list[int]

  @property
  def length(self) -> int:
    return len(self.before) + self.num_soft + len(self.after)

  @property
  def num_soft(self) -> int:
    return 0 if self.soft is None else int(self.soft.shape[0])


def prompt_arrays(rows: Sequence[PromptRow], size: int, length: int, soft_slots: int,
                  width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(ids, soft_index, mask [size, length], soft [size, soft_slots, width]) in the prompt layout;
  rows beyond `rows` repeat its last one (batch padding)."""
  ids = np.zeros((size, length), np.int32)  # padding slots are masked; any valid id will do
  soft_index = np.full((size, length), -1, np.int32)
  mask = np.zeros((size, length), np.int32)
  soft = np.zeros((size, soft_slots, width), np.float32)
  for index in range(size):
    row = rows[min(index, len(rows) - 1)]
    start = length - row.length
    middle = start + len(row.before)
    ids[index, start:middle] = row.before
    ids[index, middle + row.num_soft:] = row.after
    soft_index[index, middle:middle + row.num_soft] = np.arange(row.num_soft)
    mask[index, start:] = 1
    if row.num_soft:
      soft[index, :row.num_soft] = row.soft
  return ids, soft_index, mask, soft


def bucket(size: int, minimum: int = 1, multiple: int = 1) -> int:
  """`size` rounded up to a fixed bucket: powers of two from `minimum`, then steps of
  LINEAR_BUCKET_STEP; always a multiple of `multiple` (the batch-sharding size)."""
  size = max(int(size), int(minimum), 1)
  rounded = 1 << (size - 1).bit_length() if size <= LINEAR_BUCKET_STEP else (
      -(-size // LINEAR_BUCKET_STEP) * LINEAR_BUCKET_STEP)
  return -(-rounded // multiple) * multiple


def bucketed_calls(total: int, minimum: int, largest: int,
                   multiple: int = 1) -> list[tuple[int, int]]:
  """(items, rows) of consecutive calls that cover `total` items, each padded to `rows` =
  `bucket(items, minimum, multiple)` and holding at most `largest` items.

  One bucket for all could pad almost twofold (300 chunks in 512 rows). Where it would pad by
  `minimum` rows or more, a call takes the largest power of two of items that fits instead and the
  rest follow, so the calls pad fewer than `minimum` rows in all (plus rounding to `multiple`)
  while every call keeps a bucket's shape, compiled once for all inputs."""
  calls, left = [], int(total)
  while left > 0:
    items = min(left, largest)
    if bucket(items, minimum, multiple) - items >= minimum:
      items = 1 << (items.bit_length() - 1)
    calls.append((items, bucket(items, minimum, multiple)))
    left -= items
  return calls


def id_table(sequences: Sequence[Sequence[int]], rows: int, width: int, what: str) -> np.ndarray:
  """Right-aligned ids [rows, width], UNUSED_ID elsewhere (sequences longer keep their last ids)."""
  sequences = [list(s) for s in sequences if len(s)]
  if len(sequences) > rows:
    raise errors.UserError(f"at most {rows} {what} are supported, got {len(sequences)}; pass "
                           "fewer.")
  table = np.full((rows, width), UNUSED_ID, np.int32)
  for row, ids in enumerate(sequences):
    ids = ids[-width:]
    table[row, width - len(ids):] = ids
  return table


def prompt_embeddings(cfg: e2llm.E2LLMConfig, frozen: Any, ids: jax.Array, soft: jax.Array,
                      soft_index: jax.Array) -> jax.Array:
  """Decoder inputs [B,L,D]: token embeddings, with soft tokens in the slots `soft_index` names."""
  text = llama.embed(cfg.decoder, frozen["decoder"], ids)
  picked = jnp.take_along_axis(soft, jnp.maximum(soft_index, 0)[..., None], axis=1)
  return jnp.where((soft_index >= 0)[..., None], picked.astype(text.dtype), text)


def prefill(cfg: e2llm.E2LLMConfig, frozen: Any, trainable: Any, ids: jax.Array, soft: jax.Array,
            soft_index: jax.Array, mask: jax.Array, cache_length: int) -> tuple[jax.Array, dict]:
  """(logits [B,V] of the first new token, KV cache of `cache_length` slots holding the prompt)."""
  embeds = prompt_embeddings(cfg, frozen, ids, soft, soft_index)
  lora = e2llm.scaled_lora(trainable, "decoder_lora", cfg.decoder_lora)
  cache = llama.init_cache(cfg.decoder, ids.shape[0], cache_length)
  # Two appends, so only the last slot's logits are computed (the first call's are dead code).
  _, cache = llama.decoder_step(cfg.decoder, frozen["decoder"], cache, inputs_embeds=embeds[:, :-1],
                                attention_mask=mask[:, :-1], lora=lora)
  logits, cache = llama.decoder_step(cfg.decoder, frozen["decoder"], cache,
                                     inputs_embeds=embeds[:, -1:], attention_mask=mask[:, -1:],
                                     lora=lora)
  return logits[:, -1], cache


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Logits outside the top-k, then outside the top-p nucleus, set to -inf (HF's order)."""
  vocab = logits.shape[-1]
  descending = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  logits = jnp.where(logits < descending[:, k - 1][:, None], -jnp.inf, logits)
  descending = jnp.where(jnp.arange(vocab) < k, descending, -jnp.inf)
  probs = jax.nn.softmax(descending, axis=-1)
  # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it is below.
  kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p, axis=-1)
  cutoff = jnp.take_along_axis(descending, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """Next ids [B]: argmax at temperature 0, else a sample from the filtered, tempered logits."""
  logits = logits.astype(jnp.float32)

  def sample(logits):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda x, *_: x, scaled,
                          top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, sample, greedy, logits)


def _ends_with(tokens: jax.Array, step: jax.Array, table: jax.Array) -> jax.Array:
  """[B]: the ids up to `step` end with one of the (right-aligned) sequences of `table`."""
  width = table.shape[1]
  padded = jnp.concatenate([jnp.full((tokens.shape[0], width), UNUSED_ID - 1, tokens.dtype),
                            tokens], axis=1)
  window = jax.lax.dynamic_slice_in_dim(padded, step + 1, width, axis=1)  # ids step-width+1..step
  used = table != UNUSED_ID
  match = jnp.all(~used[None] | (window[:, None, :] == table[None]), axis=-1)
  return jnp.any(match & jnp.any(used, axis=-1)[None], axis=-1)


def decode(cfg: e2llm.E2LLMConfig, frozen: Any, trainable: Any, cache: dict, logits: jax.Array,
           limit: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seed: jax.Array, eos_ids: jax.Array, stop_ids: jax.Array, pad_id: jax.Array,
           max_new: int) -> tuple[jax.Array, jax.Array]:
  """(new ids [B,max_new], steps run): up to `limit` ≤ max_new ids after the prefill's `logits`.

  A row is done at an id of `eos_ids` (kept) or at the end of a stop sequence of `stop_ids`; its
  later slots hold `pad_id`. The loop ends when every row is done. Row `b` samples with
  `fold_in(fold_in(key(seed), b), step)`.
  """
  batch = logits.shape[0]
  lora = e2llm.scaled_lora(trainable, "decoder_lora", cfg.decoder_lora)
  base = jax.random.key(seed)
  row_keys = jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.arange(batch))
  tokens = jnp.full((batch, max_new), pad_id, jnp.int32)

  def running(carry):
    step, _, _, _, done = carry
    return (step < limit) & ~jnp.all(done)

  def body(carry):
    step, tokens, logits, cache, done = carry
    keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
    token = jnp.where(done, pad_id, select_tokens(logits, keys, temperature, top_k, top_p))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    done = done | jnp.any(token[:, None] == eos_ids[None], axis=-1) | _ends_with(tokens, step,
                                                                                  stop_ids)
    logits, cache = llama.decoder_step(cfg.decoder, frozen["decoder"], cache,
                                       inputs_embeds=llama.embed(cfg.decoder, frozen["decoder"],
                                                                 token[:, None]), lora=lora)
    return step + 1, tokens, logits[:, -1], cache, done

  done = jnp.zeros((batch,), bool)
  start = (jnp.zeros((), jnp.int32), tokens, logits, cache, done)
  steps, tokens, _, _, _ = jax.lax.while_loop(running, body, start)
  return tokens, steps
