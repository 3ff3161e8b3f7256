"""Synthetic token-level passkey retrieval for tiny random towers (the shape of RULER niah_single_1).

A marked value hides in one of N chunks of noise tokens; the answer is the value. Batches are a pure function of (seed, step).
"""

import dataclasses

import numpy as np

from e2llm_jax.data.tasks import TASK_INSTRUCTION as TASK_IFT, TASK_RECONSTRUCTION as TASK_RECON

PAD, BOS, EOS, KEY_MARK, QUERY_MARK = 0, 1, 2, 3, 4
KEY_BASE, NUM_KEYS_MAX = 10, 16
DIGIT_BASE = 26  # value symbols take ids [DIGIT_BASE, DIGIT_BASE + value_vocab)
HELD_OUT_SALT = 7_777_777  # a seed stream no training step draws from
PASSKEY, RECON = "passkey", "recon"  # the task names of a passkey run's data.tasks


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
  """Examples in the model's batch layout, in token ids shared by both tiny towers.

  `num_keys` > 1 gives the key→value variant: each of `num_keys` keys hides its own value in a
  different chunk and the query names one key.
  """
  vocab_size: int
  value_vocab: int = 10  # symbols a value digit draws from (10: decimal digits)
  num_chunks: int = 8
  chunk_tokens: int = 16
  value_digits: int = 4
  num_keys: int = 1
  recon_fraction: float = 0.0
  recon_window: int = 1
  target_tokens: int = 0  # 0: long enough for every target; else longer ones keep their head, no EOS
  # True: a needle opens its chunk, as when chunks are cut at the needle's sentence; False: it sits
  # at a random offset. Both draw the same random numbers, so only the placement differs.
  needle_at_chunk_start: bool = False

  def __post_init__(self):
    if self.vocab_size <= self.noise_base + 8:
      raise ValueError(f"Passkey with value_vocab={self.value_vocab} needs vocab_size > "
                       f"{self.noise_base + 8}, got {self.vocab_size}.")
    if not 1 <= self.num_keys <= min(NUM_KEYS_MAX, self.num_chunks):
      raise ValueError(f"num_keys must be in 1..{min(NUM_KEYS_MAX, self.num_chunks)}.")
    if 0 < self.target_tokens <= self.value_digits:
      raise ValueError(f"target_tokens={self.target_tokens} cannot hold a {self.value_digits}-digit "
                       "answer and its end-of-sequence token.")

  @property
  def noise_base(self) -> int:
    return DIGIT_BASE + self.value_vocab

  @property
  def target_length(self) -> int:
    full = max(self.value_digits, self.recon_window * self.chunk_tokens) + 1
    return min(full, self.target_tokens) if self.target_tokens else full

  def _example(self, rng: np.random.Generator, recon: bool) -> dict:
    n, t = self.num_chunks, self.chunk_tokens
    chunks = rng.integers(self.noise_base, self.vocab_size, size=(n, t))
    keys = rng.choice(NUM_KEYS_MAX, size=self.num_keys, replace=False)
    holders = rng.choice(n, size=self.num_keys, replace=False)
    values = rng.integers(0, self.value_vocab, size=(self.num_keys, self.value_digits))
    needle_len = self.value_digits + (2 if self.num_keys > 1 else 1)
    for key, holder, value in zip(keys, holders, values):
      offset = rng.integers(0, t - needle_len + 1)
      start = 0 if self.needle_at_chunk_start else offset
      needle = [KEY_MARK] + ([KEY_BASE + key] if self.num_keys > 1 else []) + list(
          DIGIT_BASE + value)
      chunks[holder, start:start + needle_len] = needle
    asked = rng.integers(self.num_keys)
    chunk_mask = np.ones(n, np.int32)
    query = [QUERY_MARK] + ([KEY_BASE + keys[asked]] if self.num_keys > 1 else [])
    if recon:
      first = rng.integers(0, n - self.recon_window + 1)
      window = np.zeros(n, np.int32)
      window[first:first + self.recon_window] = 1
      chunk_mask = window
      target = list(chunks[first:first + self.recon_window].reshape(-1))
      query = [QUERY_MARK, QUERY_MARK]
    else:
      target = list(DIGIT_BASE + values[asked])
    target = (target + [EOS])[:self.target_length]
    target_ids = np.zeros(self.target_length, np.int32)
    target_ids[:len(target)] = target
    target_mask = (np.arange(self.target_length) < len(target)).astype(np.int32)
    query_ids = np.full(2, PAD, np.int32)
    query_ids[:len(query)] = query
    return {
        "chunk_ids": chunks.astype(np.int32),
        "chunk_token_mask": np.ones((n, t), np.int32),
        "chunk_mask": chunk_mask,
        "prefix_ids": np.array([BOS], np.int32),
        "prefix_mask": np.ones(1, np.int32),
        "query_ids": query_ids,
        "query_mask": (np.arange(2) < len(query)).astype(np.int32),
        "target_ids": target_ids,
        "target_mask": target_mask,
        "task": np.int32(TASK_RECON if recon else TASK_IFT),
        "chunks_dropped": np.int32(0),
    }

  def global_batch(self, seed: int, step: int, batch_size: int, held_out: bool = False) -> dict:
    """The whole batch of `step`; every process computes the same one and keeps its slice."""
    rng = np.random.default_rng([seed, step, HELD_OUT_SALT if held_out else 0])
    is_recon = rng.random(batch_size) < (0.0 if held_out else self.recon_fraction)
    examples = [self._example(rng, bool(r)) for r in is_recon]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def process_batch(self, seed: int, step: int, batch_size: int, process_index: int = 0,
                    process_count: int = 1, held_out: bool = False) -> dict:
    per_process = batch_size // process_count
    batch = self.global_batch(seed, step, batch_size, held_out)
    return {k: v[process_index * per_process:(process_index + 1) * per_process]
            for k, v in batch.items()}


def is_passkey_run(config) -> bool:
  """A run whose data.tasks are passkey (with or without recon): random towers, token ids only."""
  return set(config.data.tasks) <= {PASSKEY, RECON} and PASSKEY in config.data.tasks


def task_from_config(config, vocab_size: int) -> PasskeyTask:
  """The passkey task of a run's `config.data`, in ids below `vocab_size` (shared by both towers)."""
  weights = dict(config.data.tasks)
  total = sum(weights.values())
  return PasskeyTask(
      vocab_size=vocab_size, num_chunks=config.data.max_chunks, chunk_tokens=config.data.chunk_tokens,
      value_digits=config.data.passkey.value_digits, value_vocab=config.data.passkey.value_vocab,
      num_keys=config.data.passkey.num_keys,
      needle_at_chunk_start=config.data.passkey.needle_at_chunk_start,
      recon_fraction=weights.get(RECON, 0.0) / total, recon_window=config.data.recon_window,
      target_tokens=config.data.target_tokens)
