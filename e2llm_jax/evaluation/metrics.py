"""Benchmark scorers that follow the official rules exactly (RULER, LongBench v1/v2, SCROLLS), and their registry.

A metric maps scored samples (`{"pred", "answers", ...}` dicts) to `{"score": 0–100, "per_sample": [...]}`.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import re
import string
from typing import Any, Callable, Mapping, Sequence

from e2llm_jax import errors
from e2llm_jax.data import builders

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_NUMBERS = re.compile(r"\d+")
_PARAGRAPH_ID = re.compile(r"Paragraph (\d+)")
_LBV2_ANSWER = re.compile(r"The correct answer is \(([A-D])\)")
_LBV2_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")
# LongBench v1 scores only the first line of these datasets' predictions (its eval.py).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
LBV2_DIFFICULTIES = ("easy", "hard")
LBV2_LENGTHS = ("short", "medium", "long")
LBV2_NULL_CREDIT = 0.25  # "compensated" mode: an unparsable answer counts as a random guess


# -- RULER (eval/synthetic/constants.py, eval/evaluate.py). -----------------------------------------

def ruler_postprocess(prediction: str) -> str:
  """RULER: strip, every control character becomes a newline, strip again."""
  return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _ruler_found(prediction: str, references: Sequence[str]) -> list[bool]:
  pred = ruler_postprocess(prediction).lower()
  return [r.lower() in pred for r in references]


def ruler_all_sample(prediction: str, references: Sequence[str]) -> float:
  """string_match_all for one sample: the share of gold strings found (case-insensitive)."""
  return sum(_ruler_found(prediction, references)) / len(references)


def ruler_part_sample(prediction: str, references: Sequence[str]) -> float:
  """string_match_part for one sample: 1 if any gold string is found (case-insensitive)."""
  return float(max(_ruler_found(prediction, references)))


def ruler_metric_name(task: str) -> str:
  """The metric RULER scores `task` with: QA tasks any one answer, every other task all of them."""
  return "ruler_part" if task.startswith(builders.RULER_ANY_OUTPUT_TASK_PREFIX) else "ruler_all"


def ruler_score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """RULER's score of `task` on the official 0–100 scale (2 decimals)."""
  return METRICS[ruler_metric_name(task)](_pairs(predictions, references))["score"]


def _pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict]:
  return [{"pred": p, "answers": list(r)} for p, r in zip(predictions, references, strict=True)]


# -- LongBench v1 (LongBench/metrics.py). -------------------------------------------------------------

def normalize_answer(text: str) -> str:
  """Lowercase, remove punctuation, remove articles, collapse whitespace (SQuAD's normalisation)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
  """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
  same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, gold: str, **_: Any) -> float:
  return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def rouge_l_score(prediction: str, gold: str, **_: Any) -> float:
  """LongBench's ROUGE-L: the `rouge` package's summary-level LCS F; any failure (empty text) is 0."""
  from rouge import Rouge  # pylint: disable=g-import-not-at-top
  try:
    return float(Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
  except Exception:  # pylint: disable=broad-except  # LongBench's rule: a scorer error scores 0
    return 0.0


def classification_score(prediction: str, gold: str, *, all_classes: Sequence[str] = (),
                         **_: Any) -> float:
  """Class names found in the prediction, less those inside the gold; 1/len if the gold is among them."""
  matches = [name for name in all_classes if name in prediction]
  # LongBench removes from the list while iterating over it, which skips the element after each
  # removal; the loop is kept as it is so scores match the official ones.
  for name in matches:
    if name in gold and name != gold:
      matches.remove(name)
  return 1.0 / len(matches) if gold in matches else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
  numbers = _NUMBERS.findall(prediction)
  return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, gold: str, **_: Any) -> float:
  """Share of the numbers in the prediction that equal the gold count."""
  return _share_equal(prediction, str(gold))


def retrieval_score(prediction: str, gold: str, **_: Any) -> float:
  """Share of the numbers in the prediction that equal the gold "Paragraph N" id."""
  found = _PARAGRAPH_ID.findall(gold)
  if not found:
    raise errors.DataError(f"retrieval answer {gold!r} does not name a paragraph as 'Paragraph N'.")
  return _share_equal(prediction, found[0])


def fuzz_ratio(a: str, b: str) -> int:
  """fuzzywuzzy's `fuzz.ratio` (its difflib path): round(100 · SequenceMatcher ratio), 0 for an empty text."""
  if a == b:
    return 100
  if not a or not b:
    return 0
  return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, gold: str, **_: Any) -> float:
  """The first prediction line that is no comment or code fence, fuzz.ratio / 100 against the gold."""
  first = next((line for line in prediction.lstrip("\n").split("\n")
                if "`" not in line and "#" not in line and "//" not in line), "")
  return fuzz_ratio(first, gold) / 100


def first_line(prediction: str) -> str:
  """LongBench's rule for trec, triviaqa, samsum and lsht: only the first line is scored."""
  return prediction.lstrip("\n").split("\n")[0]


def exact_match_score(prediction: str, gold: str, **_: Any) -> float:
  """SCROLLS / SQuAD exact match (QuALITY): equal after `normalize_answer`."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


# -- LongBench v2 (pred.py extract_answer, result.py). ----------------------------------------------

def extract_choice(response: str) -> str | None:
  """The letter in "The correct answer is (X)" (else "... is X"), `*` removed first; None if absent."""
  response = response.replace("*", "")
  match = _LBV2_ANSWER.search(response) or _LBV2_ANSWER_BARE.search(response)
  return match.group(1) if match else None


def _lbv2_gold(sample: Mapping[str, Any]) -> str:
  if "answer" in sample:
    return str(sample["answer"]).strip()
  return str(sample["answers"][0]).strip()


def lbv2_accuracy(samples: Sequence[Mapping[str, Any]], compensated: bool = False) -> dict:
  """Accuracy overall and by `difficulty` (easy/hard) and `length` (short/medium/long), 1 decimal."""
  per_sample = []
  for sample in samples:
    choice = extract_choice(str(sample["pred"]))
    per_sample.append(LBV2_NULL_CREDIT if choice is None and compensated
                      else float(choice == _lbv2_gold(sample)))
  result = {"score": _percent(per_sample, 1), "per_sample": per_sample}
  for field, groups in (("difficulty", LBV2_DIFFICULTIES), ("length", LBV2_LENGTHS)):
    for group in groups:
      chosen = [s for s, sample in zip(per_sample, samples) if sample.get(field) == group]
      result[group] = _percent(chosen, 1) if chosen else None
  return result


# -- SCROLLS G-mean (metrics/scrolls.py). -------------------------------------------------------------

SCROLLS_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def scrolls_gmean(samples: Sequence[Mapping[str, Any]]) -> dict:
  """Cube root of the corpus means of R1, R2, RL (each the max over references of F × 100)."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(list(SCROLLS_ROUGE_TYPES), use_stemmer=False)
  rows = []
  for sample in samples:
    scores = [scorer.score(str(gold), str(sample["pred"])) for gold in _answers(sample)]
    rows.append([max(s[kind].fmeasure for s in scores) * 100 for kind in SCROLLS_ROUGE_TYPES])
  means = [sum(column) / len(rows) if rows else 0.0 for column in zip(*rows)] or [0.0] * 3
  result = {"score": math.prod(means) ** (1 / 3),
            "per_sample": [math.prod(row) ** (1 / 3) / 100 for row in rows]}
  result.update(zip(SCROLLS_ROUGE_TYPES, means))
  return result


# -- The registry. -------------------------------------------------------------------------------------

def _answers(sample: Mapping[str, Any]) -> list[str]:
  answers = sample.get("answers")
  if answers is None and "answer" in sample:
    answers = [sample["answer"]]
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise errors.DataError(f"sample has no gold answers (fields: {sorted(sample)}); give 'answers': [...].")
  return [str(a) for a in answers]


def _percent(values: Sequence[float], decimals: int = 2) -> float:
  return round(100 * sum(values) / max(len(values), 1), decimals)


@dataclasses.dataclass(frozen=True)
class MaxOverAnswers:
  """A per-answer scorer maxed over each sample's answers, averaged, ×100, 2 decimals (LongBench, RULER)."""
  scorer: Callable[..., float]

  def __call__(self, samples: Sequence[Mapping[str, Any]], first_line_only: bool = False) -> dict:
    per_sample = []
    for sample in samples:
      prediction = str(sample["pred"])
      if first_line_only:
        prediction = first_line(prediction)
      classes = sample.get("all_classes") or ()
      per_sample.append(max(self.scorer(prediction, gold, all_classes=classes)
                            for gold in _answers(sample)))
    return {"score": _percent(per_sample), "per_sample": per_sample}


@dataclasses.dataclass(frozen=True)
class WholeAnswerList:
  """A scorer that reads all of a sample's answers at once (RULER string match)."""
  scorer: Callable[[str, Sequence[str]], float]

  def __call__(self, samples: Sequence[Mapping[str, Any]], first_line_only: bool = False) -> dict:
    del first_line_only  # RULER post-processes instead
    per_sample = [self.scorer(str(s["pred"]), _answers(s)) for s in samples]
    return {"score": _percent(per_sample), "per_sample": per_sample}


def _lbv2(samples, first_line_only: bool = False, compensated: bool = False) -> dict:
  del first_line_only
  return lbv2_accuracy(samples, compensated)


def _gmean(samples, first_line_only: bool = False) -> dict:
  del first_line_only
  return scrolls_gmean(samples)


METRICS: dict[str, Callable[..., dict]] = {
    "ruler_all": WholeAnswerList(ruler_all_sample),
    "ruler_part": WholeAnswerList(ruler_part_sample),
    "qa_f1": MaxOverAnswers(qa_f1_score),
    "rouge_l": MaxOverAnswers(rouge_l_score),
    "gmean": _gmean,
    "lbv2_acc": _lbv2,
    "em": MaxOverAnswers(exact_match_score),
    "classification": MaxOverAnswers(classification_score),
    "count": MaxOverAnswers(count_score),
    "retrieval": MaxOverAnswers(retrieval_score),
    "code_sim": MaxOverAnswers(code_sim_score),
}


def get_metric(name: str) -> Callable[..., dict]:
  if name not in METRICS:
    raise errors.ConfigError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}.")
  return METRICS[name]


def score(metric: str, samples: Sequence[Mapping[str, Any]], *, dataset: str | None = None,
          **options: Any) -> dict:
  """`metric` over `samples`; a LongBench `dataset` name turns on its first-line rule."""
  first_line_only = bool(options.pop("first_line_only", False)) or dataset in FIRST_LINE_DATASETS
  return get_metric(metric)(samples, first_line_only=first_line_only, **options)
