"""E2LLM and its baselines on the same decoder: `e2llm` (soft tokens), `full`, `none` and `rag` (text prompts).

Each wraps an inference engine (`e2llm_jax.inference.E2LLM`) and answers runner samples (see `runner`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from e2llm_jax import errors
from e2llm_jax.data import tasks
from e2llm_jax.evaluation.runner import Prediction

BASELINES = ("full", "none", "rag")
# Tokens kept free of context in a `full` prompt for what wraps it: the chat template's turns and the
# tokenizer's own special tokens (SmolLM2's and Llama's need under 40).
CHAT_TEMPLATE_ALLOWANCE = 64


def count_tokens(tokenizer: Any, text: str) -> int:
  return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, int]:
  """`text` cut to its first and last `max_tokens // 2` tokens (LongBench's rule); (text, tokens kept)."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if len(ids) <= max_tokens:
    return text, len(ids)
  head, tail = max_tokens // 2, max_tokens - max_tokens // 2
  kept = ids[:head] + (ids[-tail:] if tail else [])
  return (tokenizer.decode(ids[:head], skip_special_tokens=True)
          + tokenizer.decode(ids[-tail:] if tail else [], skip_special_tokens=True)), len(kept)


def render(template: Any, context: str, question: str) -> str:
  """The prompt text of a sample with `context` written out where E2LLM puts its soft tokens."""
  return tasks.resolve_template(template).text.format(context=context, question=question)


def _groups(samples: Sequence[dict[str, Any]]) -> dict[tuple, list[int]]:
  """Sample indices grouped by what one engine call must share (template and answer budget)."""
  groups: dict[tuple, list[int]] = {}
  for index, sample in enumerate(samples):
    template = tasks.resolve_template(sample["template"])
    groups.setdefault((template, int(sample["max_new_tokens"])), []).append(index)
  return groups


def _ratio(context_tokens: int, read_tokens: int) -> float | None:
  return context_tokens / read_tokens if read_tokens else None


class E2LLMPredictor:
  """The context compressed into soft tokens (`engine.compress`), answered with `generate_batch`."""
  name = "e2llm"

  def __init__(self, engine: Any):
    self.engine = engine

  def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
    texts: list[str | None] = [None] * len(samples)
    ratios: list[float | None] = [None] * len(samples)
    for (template, max_new), indices in _groups(samples).items():
      contexts = self.engine.compress([samples[i]["context"] for i in indices])
      answers = self.engine.generate_batch([samples[i]["question"] for i in indices], contexts,
                                           max_new_tokens=max_new, template=template)
      for i, context, answer in zip(indices, contexts, answers):
        texts[i], ratios[i] = answer, float(context.compression_ratio)
    return [Prediction(t, r) for t, r in zip(texts, ratios)]


class _TextPredictor:
  """A baseline that hands the decoder a text prompt; subclasses choose the context text."""
  name = ""

  def __init__(self, engine: Any):
    self.engine = engine

  def context_text(self, sample: dict[str, Any], prompt_budget: int) -> tuple[str, float | None]:
    raise NotImplementedError

  def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
    texts: list[str | None] = [None] * len(samples)
    ratios: list[float | None] = [None] * len(samples)
    for (template, max_new), indices in _groups(samples).items():
      prompts = []
      for i in indices:
        budget = int(self.engine.decoder_window) - max_new - CHAT_TEMPLATE_ALLOWANCE
        context, ratios[i] = self.context_text(samples[i], budget)
        prompts.append(render(template, context, samples[i]["question"]))
      for i, answer in zip(indices, self.engine.generate_text(prompts, max_new_tokens=max_new)):
        texts[i] = answer
    return [Prediction(t, r) for t, r in zip(texts, ratios)]


class FullContextPredictor(_TextPredictor):
  """The whole context as text, cut in the middle to fit the decoder's window (LongBench's protocol)."""
  name = "full"

  def context_text(self, sample, prompt_budget):
    tokenizer = self.engine.decoder_tokenizer
    overhead = count_tokens(tokenizer, render(sample["template"], "", sample["question"]))
    context_tokens = count_tokens(tokenizer, sample["context"])
    text, kept = truncate_middle(tokenizer, sample["context"], max(prompt_budget - overhead, 0))
    return text, _ratio(context_tokens, kept)


class NoContextPredictor(_TextPredictor):
  """The question alone: what the decoder answers without the context (compression ratio: none)."""
  name = "none"

  def context_text(self, sample, prompt_budget):
    del sample, prompt_budget
    return "", None


class RagPredictor(_TextPredictor):
  """The chunks most similar to the question (encoder mean-pooled cosine), as text in document order.

  Budget: `budget_tokens` decoder tokens if given, else as many as E2LLM's soft tokens for the same
  context (chunks × `soft_tokens_per_chunk`), so both read the same number of decoder positions; the
  best chunk is always given, even where it alone is over the budget (the row's ratio shows it).
  """
  name = "rag"

  def __init__(self, engine: Any, soft_tokens_per_chunk: int = 1, budget_tokens: int = 0):
    super().__init__(engine)
    self.soft_tokens_per_chunk = int(soft_tokens_per_chunk)
    self.budget_tokens = int(budget_tokens)

  def context_text(self, sample, prompt_budget):
    tokenizer = self.engine.decoder_tokenizer
    chunks = list(self.engine.chunk(sample["context"]))
    if not chunks:
      return "", None
    budget = self.budget_tokens or len(chunks) * self.soft_tokens_per_chunk
    overhead = count_tokens(tokenizer, render(sample["template"], "", sample["question"]))
    budget = min(budget, max(prompt_budget - overhead, 0))
    chunk_vectors = np.asarray(self.engine.embed_texts(chunks), np.float32)
    question_vector = np.asarray(self.engine.embed_texts([sample["question"]]), np.float32)[0]
    similarity = chunk_vectors @ question_vector / np.maximum(
        np.linalg.norm(chunk_vectors, axis=1) * np.linalg.norm(question_vector), 1e-12)
    chosen, used = [], 0
    for index in np.argsort(-similarity, kind="stable"):
      size = count_tokens(tokenizer, chunks[index])
      if chosen and used + size > budget:
        continue  # a smaller chunk further down may still fit
      chosen.append(int(index))
      used += size
    text = " ".join(chunks[i] for i in sorted(chosen))
    return text, _ratio(count_tokens(tokenizer, sample["context"]), used)


PREDICTORS = {"e2llm": E2LLMPredictor, "full": FullContextPredictor, "none": NoContextPredictor,
              "rag": RagPredictor}


def make_predictors(engine: Any, baselines: Sequence[str], soft_tokens_per_chunk: int = 1,
                    rag_budget_tokens: int = 0) -> list[Any]:
  """E2LLM first, then the named baselines (a subset of BASELINES)."""
  unknown = [b for b in baselines if b not in BASELINES]
  if unknown:
    raise errors.ConfigError(f"eval.baselines names {unknown}; choose from {BASELINES}.")
  made = [E2LLMPredictor(engine)]
  for name in baselines:
    if name == "rag":
      made.append(RagPredictor(engine, soft_tokens_per_chunk, rag_budget_tokens))
    else:
      made.append(PREDICTORS[name](engine))
  return made
