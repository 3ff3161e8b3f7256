"""Held-out evaluation of a run in progress: token-exact passkey retrieval, or RULER through the runner.

The training loop and eval.py call `HeldOutEvaluator`; compiled functions live as long as it does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from e2llm_jax import sharding
from e2llm_jax.data import passkey, pipeline, ruler
from e2llm_jax.evaluation import predictors, runner
from e2llm_jax.models import e2llm

DEFAULT_RULER_TASK = "niah_single_1"  # what a text run is scored on when it trains on no RULER task


def process_sum(values: np.ndarray) -> np.ndarray:
  """`values` summed over every process (each passes its own)."""
  if jax.process_count() == 1:
    return np.asarray(values)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)


def passkey_exact_match(tokens: np.ndarray, targets: np.ndarray, digits: int,
                        sum_over_processes: Callable[[np.ndarray], np.ndarray] = process_sum
                        ) -> tuple[float, int]:
  """(share of rows whose first `digits` generated tokens equal the target's, rows scored in all).

  Each process passes its own rows; counts are summed over processes before dividing.
  """
  local = np.array([np.sum(np.all(tokens[:, :digits] == targets[:, :digits], axis=1)), len(tokens)],
                   np.int64)
  matches, rows = sum_over_processes(local)
  return float(matches) / max(int(rows), 1), int(rows)


@functools.lru_cache(maxsize=8)
def _compiled(model: e2llm.E2LLMConfig, max_new_tokens: int, eos_token_id: int):
  generate = jax.jit(functools.partial(e2llm.generate, model, max_new_tokens=max_new_tokens,
                                       eos_token_id=eos_token_id))
  losses = jax.jit(functools.partial(e2llm.loss_sums, model))
  return generate, losses


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas along the other mesh axes hold the same rows
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def evaluate_passkey(model: e2llm.E2LLMConfig, frozen: Any, trainable: Any, task: passkey.PasskeyTask,
                     seed: int, num_examples: int, batch_size: int, mesh: Any, rules: Any) -> dict:
  """Teacher-forced answer loss and greedy token-exact match on held-out passkey batches.

  Batches are rounded up to a multiple of the devices the batch is split over; `num_examples` down
  to whole batches (at least one).
  """
  generate, losses = _compiled(model, int(task.value_digits) + 1, passkey.EOS)
  batch_axes = dict(sharding.normalize_rules(rules)).get("batch", ())
  multiple = int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.shape]))
  batch_size = -(-min(int(batch_size), max(int(num_examples), 1)) // multiple) * multiple
  nll = tokens_scored = 0.0
  matched = rows = 0
  for index in range(max(num_examples // batch_size, 1)):
    local = task.process_batch(seed, index, batch_size, jax.process_index(), jax.process_count(),
                               held_out=True)
    arrays = {k: np.asarray(local[k], np.int32) for k in e2llm.BATCH_KEYS}
    shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in arrays.items()}
    batch = pipeline.global_batch(arrays, shardings)
    sums = jax.device_get(losses(frozen, trainable, batch))
    nll, tokens_scored = nll + float(sums["ift_nll"]), tokens_scored + float(sums["ift_tokens"])
    generated = _local_rows(generate(frozen, trainable, batch))
    share, count = passkey_exact_match(generated, arrays["target_ids"], task.value_digits)
    matched, rows = matched + round(share * count), rows + count
  return {"ift_loss": nll / max(tokens_scored, 1.0), "exact_match": matched / max(rows, 1),
          "examples": rows}


def held_out_ruler_tasks(config) -> list[str]:
  """The RULER tasks a text run is scored on: those it trains on, else DEFAULT_RULER_TASK."""
  return [n for n in config.data.tasks if n in ruler.TASKS] or [DEFAULT_RULER_TASK]


def held_out_text_samples(config, tokenizer: Any, chunker: Any) -> list[tuple[Any, int, list]]:
  """(task, length, samples) of each RULER task a text run is scored on, at its training length
  (`data.ruler_max_seq_length`, else the longest whose contexts fill `data.max_chunks` chunks)."""
  names = held_out_ruler_tasks(config)
  per_task = max(int(config.train.eval_examples) // len(names), 1)
  prepared = []
  for name in names:
    length = int(config.data.ruler_max_seq_length or pipeline.fit_ruler_length(
        name, chunker, int(config.data.max_chunks), tokenizer, int(config.seed)))
    task = runner.RulerTask(name, tokenizer, int(config.seed), int(config.data.target_tokens))
    prepared.append((task, length, task.samples(length, per_task)))
  return prepared


def evaluate_text(config, engine: Any, prepared: list[tuple[Any, int, list]]) -> dict:
  """E2LLM's RULER score on the held-out samples of `held_out_text_samples`."""
  result = {}
  for task, length, samples in prepared:
    name = task.name
    row, records = runner.run_one(task, length, samples, predictors.E2LLMPredictor(engine),
                                  min(int(config.train.batch_size), len(samples)))
    result[f"{name}/score"] = row["score"]
    result[f"{name}/example_prediction"] = records[0]["pred"]
  scores = [v for k, v in result.items() if k.endswith("/score")]
  result["score"] = float(np.mean(scores))
  return result


class HeldOutEvaluator:
  """The held-out evaluation of one run, called with the current trainable params at each evaluation.

  Passkey runs (data with a `PasskeyTask`) score token-exact matches; text runs build an inference
  engine from the in-memory state once and score RULER through the runner. Compiled functions are
  kept between calls, so a periodic evaluation compiles only the first time.
  """

  def __init__(self, config, model: e2llm.E2LLMConfig, frozen: Any, mesh: Any, data: Any):
    self.config, self.model, self.frozen, self.mesh, self.data = config, model, frozen, mesh, data
    self.engine = None
    self.samples = None  # generated at the first evaluation, reused by the next ones

  @property
  def is_passkey(self) -> bool:
    return isinstance(getattr(self.data, "task", None), passkey.PasskeyTask)

  def __call__(self, trainable: Any) -> dict:
    config = self.config
    if self.is_passkey:
      return evaluate_passkey(self.model, self.frozen, trainable, self.data.task, int(config.seed),
                              int(config.train.eval_examples), int(config.train.batch_size),
                              self.mesh, config.mesh.rules)
    encoder = self.data.encoder  # the pipeline's example encoder: chunker and tokenizers
    if self.engine is None:
      from e2llm_jax.inference import E2LLM  # pylint: disable=g-import-not-at-top
      self.engine = E2LLM.from_state(config, self.model, self.frozen, trainable,
                                     encoder.chunker.tokenizer, encoder.decoder_tokenizer,
                                     mesh=self.mesh)
      self.samples = held_out_text_samples(config, encoder.decoder_tokenizer, encoder.chunker)
    else:
      self.engine.trainable = trainable
    return evaluate_text(config, self.engine, self.samples)
