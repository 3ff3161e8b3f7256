"""Benchmark scorers that follow the official rules exactly (RULER string match so far).

Each scorer maps (predictions, lists of gold answers) to a score on the official 0–100 scale.
"""

import re
from typing import Sequence

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(prediction: str) -> str:
  """RULER: strip, every control character becomes a newline, strip again."""
  return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def ruler_string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """NIAH, VT, CWE, FWE: mean over samples of the share of gold strings found (case-insensitive)."""
  scores = [sum(r.lower() in ruler_postprocess(p).lower() for r in refs) / len(refs)
            for p, refs in zip(predictions, references, strict=True)]
  return round(100 * sum(scores) / max(len(scores), 1), 2)


def ruler_string_match_part(predictions: Sequence[str],
                            references: Sequence[Sequence[str]]) -> float:
  """QA: mean over samples of whether any gold string is found (case-insensitive)."""
  scores = [max(r.lower() in ruler_postprocess(p).lower() for r in refs)
            for p, refs in zip(predictions, references, strict=True)]
  return round(100 * sum(scores) / max(len(scores), 1), 2)


def ruler_score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """The metric RULER uses for `task` (string_match_part for qa_*, else string_match_all)."""
  scorer = ruler_string_match_part if task.startswith("qa") else ruler_string_match_all
  return scorer(predictions, references)
