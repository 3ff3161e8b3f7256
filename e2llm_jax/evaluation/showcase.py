"""The showcase of a shipped export: fresh held-out RULER samples, E2LLM against baselines, a worked example.

`python -m e2llm_jax.evaluation.showcase --export artifacts/demo [--lengths 4096] [--tasks ...] [--out DIR]`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Sequence

from e2llm_jax import cli, errors
from e2llm_jax.data import ruler
from e2llm_jax.evaluation import predictors, report, runner

DEFAULT_EXPORT = "artifacts/demo"
DEFAULT_TASKS = "niah_single_1,niah_single_2,qa_1"
DEFAULT_LENGTHS = "4096"
DEFAULT_BASELINES = "none,full"
DEFAULT_NUM_SAMPLES = 4
DEFAULT_BATCH_SIZE = 4
# The default seed is the run's plus this: the run was scored during training on its own seed's
# held-out stream, so the showcase draws samples that no published score has seen.
SEED_OFFSET = 1
EXAMPLE_TASK = "niah_single_1"  # the worked example's task when it is run, else the first task
METHOD_LABELS = {"e2llm": "soft tokens", "none": "no context", "full": "whole context as text",
                 "rag": "retrieved chunks as text"}
PREDICTION_CHARS = 160  # an answer longer than this is cut in the printed example
SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


@dataclasses.dataclass
class KeptRulerTask(runner.RulerTask):
  """A runner RulerTask that keeps the samples it drew, so the worked example can show their text."""
  drawn: dict = dataclasses.field(default_factory=dict)

  def samples(self, length: int, num_samples: int) -> list[dict[str, Any]]:
    self.drawn[length] = super().samples(length, num_samples)
    return self.drawn[length]


def showcase_seed(run_seed: int, seed: int | None = None) -> int:
  """`seed`, or by default one distinct from the run's (see SEED_OFFSET)."""
  return int(run_seed) + SEED_OFFSET if seed is None else int(seed)


def needle_sentence(context: str, value: str) -> str | None:
  """The sentence of `context` that holds `value` (RULER's needle), or None where it is absent."""
  at = context.find(value)
  if at < 0:
    return None
  ends_before = [m.end() for m in SENTENCE_END.finditer(context, 0, at)]
  start = ends_before[-1] if ends_before else 0
  after = SENTENCE_END.search(context, at + len(value))
  end = after.end() if after else len(context)
  return context[start:end].strip()


def _question_line(question: str) -> str:
  """The question itself, without the answer prefix RULER appends after it."""
  text = " ".join(question.split())
  return text[:text.index("?") + 1] if "?" in text else text


def _score_cell(value: float | None, digits: int = 1) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


def score_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per (task, length), one score column per method, then E2LLM's compression."""
  methods = list(dict.fromkeys(r["method"] for r in rows))
  keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
  by_key = {(r["task"], r["length"], r["method"]): r for r in rows}
  lines = ["| task | length | " + " | ".join(methods) + " | e2llm compression |",
           "|---|---:|" + "---:|" * len(methods) + "---:|"]
  for task, length in keys:
    cells = [_score_cell(by_key[task, length, m]["score"]) if (task, length, m) in by_key else "–"
             for m in methods]
    ratio = by_key.get((task, length, "e2llm"), {}).get("compression_ratio")
    compression = f"{ratio:.1f}x" if ratio else "–"
    lines.append(f"| {task} | {length} | " + " | ".join(cells) + f" | {compression} |")
  tasks = list(dict.fromkeys(task for task, _ in keys))
  if len(tasks) > 1:
    for length in dict.fromkeys(length for _, length in keys):
      cells = [_score_cell(report.mean_score(rows, method, length)) for method in methods]
      lines.append(f"| mean | {length} | " + " | ".join(cells) + " | |")
  return "\n".join(lines) + "\n"


def worked_example(tasks: Sequence[KeptRulerTask], records: Sequence[dict[str, Any]]
                   ) -> dict[str, Any] | None:
  """The first sample of EXAMPLE_TASK (else the first task) at the shortest length, every method's
  answer to it, and the needle sentence its gold answer sits in."""
  chosen = next((t for t in tasks if t.name == EXAMPLE_TASK), tasks[0] if tasks else None)
  if chosen is None or not chosen.drawn:
    return None
  length = min(chosen.drawn)
  if not chosen.drawn[length]:
    return None
  sample = chosen.drawn[length][0]
  answers = {r["method"]: r for r in records
             if r["task"] == chosen.name and r["length"] == length and r["id"] == sample["id"]}
  return {"task": chosen.name, "length": length, "id": sample["id"], "depth": sample["depth"],
          "question": _question_line(sample["question"]),
          "needle": needle_sentence(sample["context"], sample["answers"][0]),
          "gold": list(sample["answers"]),
          "predictions": {method: {"pred": r["pred"], "score": r["score"],
                                   "compression_ratio": r["compression_ratio"]}
                          for method, r in answers.items()}}


def _verdict(score: float) -> str:
  return "right" if score >= 1 else "wrong" if score <= 0 else f"{100 * score:.0f}% right"


def format_example(example: dict[str, Any]) -> str:
  """The worked example as lines of text: question, needle, gold answer, each method's answer."""
  depth = f", needle at {example['depth']:.0f}% depth" if example["depth"] is not None else ""
  needle = example["needle"] or "(the answer is not written verbatim in the context)"
  lines = [f"Worked example ({example['task']}, {example['length']} tokens, sample "
           f"{example['id']}{depth}):",
           f"  question: {example['question']}",
           f"  needle:   {needle}",
           f"  gold:     {' | '.join(example['gold'])}"]
  width = max((len(m) + len(METHOD_LABELS.get(m, m)) for m in example["predictions"]), default=0)
  for method, found in example["predictions"].items():
    label = f"{method} ({METHOD_LABELS.get(method, method)})"
    text = " ".join(found["pred"].split())
    text = text if len(text) <= PREDICTION_CHARS else text[:PREDICTION_CHARS] + "…"
    lines.append(f"  {label + ':':<{width + 4}} {json.dumps(text, ensure_ascii=False)}  "
                 f"[{_verdict(found['score'])}]")
  return "\n".join(lines) + "\n"


def run_showcase(engine: Any, task_names: Sequence[str], lengths: Sequence[int], num_samples: int,
                 baselines: Sequence[str], seed: int, tokens_per_chunk: int,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> dict[str, Any]:
  """E2LLM and `baselines` on `num_samples` held-out samples of each task at each length.

  Samples come from the runner's held-out evaluation stream of `seed` (RULER's evaluation question
  pool); scores are the runner's. Returns the runner's `rows` and `samples`, the `table`, the
  worked `example` and its `example_text`.
  """
  tasks = [KeptRulerTask(name, engine.decoder_tokenizer, int(seed)) for name in task_names]
  methods = predictors.make_predictors(engine, list(baselines), int(tokens_per_chunk))
  results = runner.evaluate(tasks, [int(n) for n in lengths], methods,
                            num_samples=int(num_samples), batch_size=int(batch_size),
                            progress=progress)
  example = worked_example(tasks, results["samples"])
  return {**results, "table": score_table(results["rows"]), "example": example,
          "example_text": format_example(example) if example else ""}


def header(export: str, step: Any, num_samples: int, seed: int, run_seed: int) -> str:
  """What the table shows, on which samples."""
  return (f"{export} (checkpoint step {step}): RULER string-match score (0–100) on {num_samples} "
          f"fresh held-out samples per row (evaluation stream, seed {seed}; training and its "
          f"held-out scores used seed {run_seed}). Compression: context tokens per soft token.\n")


def write_outputs(shown: dict[str, Any], heading: str, out: pathlib.Path, extra: dict[str, Any]
                  ) -> dict[str, pathlib.Path]:
  """The runner's report files under `out`; report.md opens on the showcase table and example."""
  written = report.write(shown, out, extra={**extra, "example": shown["example"]})
  example = f"```text\n{shown['example_text']}```\n\n" if shown["example_text"] else ""
  every_row = "#" + written["report"].read_text()  # the runner's report, one heading level down
  written["report"].write_text(f"# Showcase\n\n{heading}\n{shown['table']}\n{example}{every_row}")
  return written


# ----------------------------------------------------------------------------------------------
# The command line: arguments checked before any weights load.


def _names(spec: str) -> list[str]:
  return [part.strip() for part in str(spec).split(",") if part.strip()]


def parse_args(argv: Sequence[str]) -> Any:
  parser = cli.ArgumentParser(prog="python -m e2llm_jax.evaluation.showcase",
                              description=__doc__.splitlines()[0])
  parser.add_argument("--export", default=DEFAULT_EXPORT,
                      help="export folder (python -m e2llm_jax.hf.export); default: the shipped "
                      "demo model")
  parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated RULER task names")
  parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                      help="comma-separated context lengths in decoder tokens")
  parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
                      help="samples per task and length")
  parser.add_argument("--baselines", default=DEFAULT_BASELINES,
                      help=f"comma-separated, from {','.join(predictors.BASELINES)} (may be empty)")
  parser.add_argument("--seed", type=int, default=None,
                      help=f"held-out stream seed (default: the run's seed + {SEED_OFFSET})")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--out", default=None, help="folder for results.json, report.md, plots")
  parser.add_argument("--encoder-path", default=None,
                      help="base encoder weights, if not where the export finds them")
  parser.add_argument("--decoder-path", default=None,
                      help="base decoder weights, if not where the export finds them")
  args = parser.parse_args(list(argv))
  args.tasks = _names(args.tasks)
  args.baselines = _names(args.baselines)
  unknown = [t for t in args.tasks if t not in ruler.TASKS]
  if unknown or not args.tasks:
    raise errors.ConfigError(f"--tasks {unknown or '(empty)'}: name RULER tasks, comma-separated, "
                             f"from {', '.join(ruler.TASKS)}.")
  bad = [b for b in args.baselines if b not in predictors.BASELINES]
  if bad:
    raise errors.ConfigError(f"--baselines {bad}: choose from {', '.join(predictors.BASELINES)}.")
  try:
    args.lengths = [int(n) for n in _names(args.lengths)]
  except ValueError:
    raise errors.ConfigError(f"--lengths {args.lengths!r}: give decoder-token counts, comma-"
                             "separated, e.g. 4096,8192.") from None
  if not args.lengths:
    raise errors.ConfigError("--lengths is empty; give decoder-token counts, e.g. 4096.")
  for task in args.tasks:
    for length in args.lengths:
      ruler.check_length(task, length)
  if args.num_samples < 1 or args.batch_size < 1:
    raise errors.ConfigError(f"--num-samples {args.num_samples} and --batch-size "
                             f"{args.batch_size} must be at least 1.")
  if not pathlib.Path(args.export).expanduser().is_dir():
    raise errors.UserError(
        f"--export {args.export!r} does not exist; pass the folder of an export (the shipped "
        f"demo model is {DEFAULT_EXPORT}/ in the repository; make one with `python -m "
        "e2llm_jax.hf.export --workdir W --out DIR --adapters-only`).")
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  from e2llm_jax.hf import bundle  # late: argument errors stay fast
  from e2llm_jax.inference import E2LLM

  export = pathlib.Path(args.export).expanduser()
  settings = bundle.read_settings(export)
  engine = E2LLM.from_export(export, encoder_path=args.encoder_path,
                             decoder_path=args.decoder_path)
  run_seed = int(engine.config.seed)
  seed = showcase_seed(run_seed, args.seed)
  if args.out:
    cli.remove_on_failure(args.out)
  shown = run_showcase(engine, args.tasks, args.lengths, args.num_samples, args.baselines, seed,
                       int(engine.model.tokens_per_chunk), args.batch_size, progress=True)
  heading = header(args.export, settings.get("step"), args.num_samples, seed, run_seed)
  print(f"{heading}\n{shown['table']}\n{shown['example_text']}")
  if args.out:
    written = write_outputs(shown, heading, pathlib.Path(args.out).expanduser(), {
        "export": args.export, "step": settings.get("step"), "seed": seed, "run_seed": run_seed,
        "num_samples": args.num_samples})
    print("\n".join(f"{name}: {path}" for name, path in written.items()))
  return 0


if __name__ == "__main__":
  cli.run(main)
