"""The jsonl CLI, `python -m e2llm_jax.data.ruler`: RULER samples of one task or all, one .jsonl per task.

Lives apart from `__main__` so that the package can re-export `main` without importing `__main__`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from e2llm_jax import cli, errors
from e2llm_jax.data.ruler.generation import check_length, generate, write_jsonl
from e2llm_jax.data.ruler.spec import QUESTION_POOLS, TASKS


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog="python -m e2llm_jax.data.ruler",
      description="Write RULER synthetic samples as jsonl, sized in a decoder tokenizer's tokens.")
  parser.add_argument("--task", required=True, choices=[*TASKS, "all"],
                      help="a RULER task, or 'all' (then --out is a folder: one <task>.jsonl per task)")
  parser.add_argument("--max-seq-length", type=int, required=True,
                      help="prompt tokens + tokens to generate, at most (e.g. 4096 ... 131072)")
  parser.add_argument("--num-samples", type=int, default=500)
  parser.add_argument("--seed", type=int, default=42)
  parser.add_argument("--tokenizer", required=True,
                      help="the decoder's tokenizer: a Hugging Face folder or a .gguf file")
  parser.add_argument("--out", required=True, help="the .jsonl file (or the folder for --task all)")
  parser.add_argument("--question-pool", choices=QUESTION_POOLS, default="eval",
                      help="QA tasks: questions reserved for RULER evaluation (default) or the training ones")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  if args.num_samples < 1:
    raise errors.ConfigError(f"--num-samples={args.num_samples}: ask for at least one sample")
  out = pathlib.Path(args.out)
  if args.task == "all":
    if out.suffix == ".jsonl":
      raise errors.ConfigError(f"--task all writes one file per task: --out must be a folder, got "
                               f"{str(out)!r}")
    targets = [(task, out / f"{task}.jsonl") for task in TASKS]
  else:
    targets = [(args.task, out)]
  for task, _ in targets:  # every length problem before any file is written
    check_length(task, args.max_seq_length)
  # Imported here: heavy, and only the CLI needs it.
  from e2llm_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = load_tokenizer(args.tokenizer)
  cli.remove_on_failure(out)
  for task, path in targets:
    samples = generate(task, args.max_seq_length, args.num_samples, args.seed, tokenizer,
                       question_pool=args.question_pool)
    write_jsonl(samples, path)
    lengths = [sample["length"] for sample in samples]
    shortest = min(lengths) if lengths else 0
    print(f"{task}: {len(samples)} samples, lengths {shortest}..{max(lengths, default=0)} "
          f"(max_seq_length {args.max_seq_length}) -> {path}", file=sys.stderr)
