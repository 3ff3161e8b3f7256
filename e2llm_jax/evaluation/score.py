"""Scoring CLI: `python -m e2llm_jax.evaluation.score --metric M --input preds.jsonl` prints one JSON object.

Lines are `{"pred", "answers", "all_classes"?}` (LongBench v2: `"answer"`, `"difficulty"`, `"length"`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, Sequence

from e2llm_jax import cli, errors
from e2llm_jax.evaluation import metrics


def read_predictions(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL file; a missing file or a bad line raises one message naming it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError(f"--input {str(path)!r} is not a file; give a JSONL file of predictions.")
  samples = []
  with path.open(encoding="utf-8") as lines:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        sample = json.loads(line)
      except json.JSONDecodeError as error:
        raise errors.DataError(f"{path}:{number} is not valid JSON ({error.msg}); fix or remove the line.") from None
      if not isinstance(sample, dict) or "pred" not in sample:
        raise errors.DataError(f"{path}:{number} has no \"pred\" field; lines are "
                         '{"pred": ..., "answers": [...]} objects.')
      samples.append(sample)
  if not samples:
    raise errors.DataError(f"{path} holds no predictions; write one JSON object a line.")
  return samples


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--metric", required=True, choices=sorted(metrics.METRICS))
  parser.add_argument("--input", required=True, help="JSONL file, one prediction a line")
  parser.add_argument("--dataset", default=None,
                      help="LongBench dataset name; trec, triviaqa, samsum and lsht score the first line")
  parser.add_argument("--first-line", action="store_true", help="score only each prediction's first line")
  parser.add_argument("--compensated", action="store_true",
                      help="lbv2_acc: an answer with no parsable choice scores 0.25")
  parser.add_argument("--per-sample", action="store_true", help="also print every sample's score")
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
  samples = read_predictions(args.input)
  options = {"compensated": True} if args.compensated else {}
  if args.compensated and args.metric != "lbv2_acc":
    raise errors.ConfigError("--compensated applies to --metric lbv2_acc only.")
  try:
    result = metrics.score(args.metric, samples, dataset=args.dataset,
                           first_line_only=args.first_line, **options)
  except KeyError as error:
    raise errors.DataError(f"{args.input}: a line lacks the field {error} that --metric {args.metric} "
                     "needs.") from None
  if not args.per_sample:
    result.pop("per_sample")
  return {"metric": args.metric, "num_samples": len(samples), **result}


def main(argv: Sequence[str] | None = None) -> None:
  print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
  cli.run(main)  # a user error prints one line and exits 2
