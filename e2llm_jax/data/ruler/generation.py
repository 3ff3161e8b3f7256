"""RULER samples: `generate` sizes each task's drafts to the token budget and writes RULER's jsonl records.

Owns the sample loop, the QA question skip rule, the record fields, the length check and the jsonl writer.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from e2llm_jax import errors
from e2llm_jax.data.ruler.fitting import Measured, Prompt, TokenCounter, UnitSearch
from e2llm_jax.data.ruler.spec import QUESTION_POOLS, TaskSpec, task_spec
from e2llm_jax.data.ruler.tasks import (QaShared, cwe_draft, fwe_draft, make_cwe_pools, make_qa_shared,
                                        make_vt_example, niah_draft, qa_draft, vt_draft)


def generate(task: str, max_seq_length: int, num_samples: int, seed: int, tokenizer: Any, *,
             question_pool: str = "eval") -> list[dict[str, Any]]:
  """`num_samples` RULER samples of `task`, each as long as fits `max_seq_length` tokens of `tokenizer`.

  Same arguments, same samples. `question_pool` ("eval" or "train") picks the QA questions reserved for RULER
  evaluation or the others (for synthetic training data); the other tasks ignore it.
  """
  spec = task_spec(task)
  if question_pool not in QUESTION_POOLS:
    raise ValueError(f"question_pool must be one of {QUESTION_POOLS}, got {question_pool!r}.")
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
  check_length(task, max_seq_length)
  budget = max_seq_length - spec.tokens_to_generate
  counter = TokenCounter(tokenizer)
  search = UnitSearch(counter, budget, task, max_seq_length)
  vt_example = make_vt_example(counter, task, seed) if spec.family == "vt" else None
  cwe_pools = make_cwe_pools(seed) if spec.family == "cwe" else None
  qa_shared = make_qa_shared(spec.qa_dataset, task, seed, question_pool) if spec.family == "qa" else None
  samples = []
  for index in range(num_samples):
    if spec.family == "niah":
      draft, extra = niah_draft(spec, task, seed, index)
    elif spec.family == "vt":
      draft, extra = vt_draft(task, seed, index, vt_example)
    elif spec.family == "cwe":
      draft, extra = cwe_draft(task, seed, index, max_seq_length, cwe_pools)
    elif spec.family == "fwe":
      draft, extra = fwe_draft(task, seed, index, max_seq_length)
    else:
      units, prompt, measured = _fit_qa_sample(task, seed, index, qa_shared, counter, budget, search)
      samples.append(_record(index, prompt, measured, spec, counter, {}))
      continue
    _, prompt, measured = search.fit(draft)
    samples.append(_record(index, prompt, measured, spec, counter, extra))
  return samples


QA_MAX_SKIPPED_QUESTIONS = 100


def _fit_qa_sample(task: str, seed: int, index: int, shared: QaShared, counter: TokenCounter, budget: int,
                   search: UnitSearch) -> tuple[int, Prompt, Measured]:
  """Sample `index` asks question `index` of the shuffled pool (cycling); one whose gold paragraphs alone
  overflow the budget is skipped for the next one."""
  if not shared.pool:
    raise ValueError(f"No questions in the QA pool of task {task!r}.")
  attempts = min(len(shared.pool), QA_MAX_SKIPPED_QUESTIONS)
  for attempt in range(attempts):
    question = shared.pool[(index + attempt) % len(shared.pool)]
    draft, _ = qa_draft(task, seed, index, question, shared, counter, budget)
    try:
      return search.fit(draft)
    except ValueError:
      if attempt == attempts - 1:
        raise
  raise AssertionError("unreachable")


def _record(index: int, prompt: Prompt, measured: Measured, spec: TaskSpec, counter: TokenCounter,
            extra: dict[str, Any]) -> dict[str, Any]:
  length = measured.length + spec.tokens_to_generate
  record = {
      "index": index, "input": prompt.input, "outputs": list(prompt.outputs), "length": length,
      "length_w_model_temp": length, "answer_prefix": prompt.answer_prefix,
      "context_start": prompt.context_start, "context_end": prompt.context_end,
  }
  if spec.family == "niah":
    text = prompt.input + prompt.answer_prefix
    answer_at = prompt.input.find(extra["answer"])
    record["token_position_answer"] = counter.token_position(text, measured, answer_at)
  return record


def check_length(task: str, max_seq_length: int) -> None:
  """A ConfigError unless `max_seq_length` leaves room for a prompt after the answer budget."""
  reserved = task_spec(task).tokens_to_generate
  if max_seq_length <= reserved:
    raise errors.ConfigError(f"max_seq_length={max_seq_length} leaves no room for a prompt: task "
                             f"{task!r} reserves {reserved} tokens to generate; use a length above "
                             f"{reserved} (RULER uses 4096 and up)")


def write_jsonl(samples: Sequence[dict[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
  """Writes one JSON object per line (UTF-8), creating the parent folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as stream:
    for sample in samples:
      stream.write(json.dumps(sample, ensure_ascii=False) + "\n")
  return path
