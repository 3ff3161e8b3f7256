"""Tasks × context lengths × methods for any predictor: samples, timed predictions, official scores, rows.

A predictor has a `name` and `predict(samples) -> list[Prediction]`; samples are dicts in the layout below.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Iterable, Protocol, Sequence

from e2llm_jax import errors
from e2llm_jax.data import builders, pipeline, ruler, seeds
from e2llm_jax.data.builders import jsonl
from e2llm_jax.evaluation import metrics

# A sample: {"id", "task", "context", "question", "answers", "template" (name or tasks.PromptTemplate),
# "depth" (needle position in % of the context, NIAH only, else None), "max_new_tokens"}, plus any fields
# its metric reads ("all_classes"; LongBench v2's "difficulty" and "length").
NIAH_PREFIX = "niah"
METRIC_TEMPLATES = {"lbv2_acc": "multiple_choice", "gmean": "summary", "rouge_l": "summary"}
JSONL_NEW_TOKENS = 128  # LongBench's largest answer budget outside summarisation
PASSED_THROUGH_FIELDS = ("all_classes", "difficulty", "length")


@dataclasses.dataclass(frozen=True)
class Prediction:
  text: str
  # Context tokens / tokens the decoder read for the context; None when it read none.
  compression_ratio: float | None


class Predictor(Protocol):
  name: str

  def predict(self, samples: Sequence[dict[str, Any]]) -> list[Prediction]:
    ...


def needle_depth(context: str, answers: Sequence[str]) -> float | None:
  """Where the first gold string sits in the context, in % of its characters (None if absent)."""
  at = context.find(answers[0]) if answers else -1
  return None if at < 0 else 100.0 * at / max(len(context), 1)


@dataclasses.dataclass
class RulerTask:
  """A RULER task generated at each length from the run seed's held-out evaluation stream."""
  name: str
  tokenizer: Any  # the decoder's: RULER lengths count its tokens
  seed: int
  max_new_tokens: int = 0  # 0: RULER's budget for the task
  sized = True  # evaluated at every length

  def __post_init__(self):
    ruler.task_spec(self.name)  # an unknown name fails before any work

  @property
  def metric(self) -> str:
    return metrics.ruler_metric_name(self.name)

  def samples(self, length: int, num_samples: int) -> list[dict[str, Any]]:
    generated = ruler.generate(self.name, int(length), num_samples,
                               seeds.stream_seed(self.seed, seeds.EVALUATION, self.name),
                               self.tokenizer, question_pool="eval")
    samples = []
    for raw in generated:
      record = builders.decode_record({**raw, "task": self.name})
      samples.append({
          "id": record["id"], "task": self.name, "context": record["context"],
          "question": record["prompt"], "answers": record["answers"],
          "template": pipeline.record_template(record),
          "max_new_tokens": self.max_new_tokens or ruler.TOKENS_TO_GENERATE[self.name],
          "depth": (needle_depth(record["context"], record["answers"])
                    if self.name.startswith(NIAH_PREFIX) else None)})
    return samples


@dataclasses.dataclass
class JsonlTask:
  """A user JSONL file (LongBench v1/v2, SCROLLS, plain layouts) scored with `metric`; lengths don't apply."""
  path: str
  metric: str
  max_new_tokens: int = 0  # 0: JSONL_NEW_TOKENS
  sized = False

  def __post_init__(self):
    metrics.get_metric(self.metric)
    if not pathlib.Path(self.path).is_file():
      raise errors.ConfigError(f"eval.tasks names the JSONL file {self.path!r}, which does not exist.")

  @property
  def name(self) -> str:
    return pathlib.Path(self.path).stem

  def samples(self, length: int | None, num_samples: int) -> list[dict[str, Any]]:
    del length  # the file's contexts are what they are
    raw_lines = pathlib.Path(self.path).read_text(encoding="utf-8").splitlines()
    samples = []
    for number, record in jsonl.read_jsonl(self.path, jsonl.JsonlStats()):
      raw = json.loads(raw_lines[number - 1])
      sample = {"id": record["id"], "task": self.name, "context": record["context"],
                "question": record["prompt"], "answers": record["answers"],
                "template": METRIC_TEMPLATES.get(self.metric, pipeline.INSTRUCTION_TEMPLATE),
                "depth": None, "max_new_tokens": self.max_new_tokens or JSONL_NEW_TOKENS}
      sample.update({k: raw[k] for k in PASSED_THROUGH_FIELDS if k in raw})
      samples.append(sample)
      if 0 < num_samples <= len(samples):
        break
    return samples


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for first in range(0, len(items), size):
    yield items[first:first + size]


def _mean(values: Sequence[float | None]) -> float | None:
  known = [v for v in values if v is not None]
  return sum(known) / len(known) if known else None


def run_one(task: Any, length: int | None, samples: Sequence[dict[str, Any]], predictor: Predictor,
            batch_size: int, progress: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(result row, per-sample records) of one predictor on one task's samples at one length."""
  predictions: list[Prediction] = []
  start = time.perf_counter()
  for batch in _batches(samples, max(int(batch_size), 1)):
    predictions += predictor.predict(list(batch))
    if progress is not None:
      progress.update(len(batch))
  seconds = time.perf_counter() - start
  if len(predictions) != len(samples):
    raise RuntimeError(f"predictor {predictor.name!r} returned {len(predictions)} predictions for "
                       f"{len(samples)} samples.")
  scored = [{**{k: s[k] for k in PASSED_THROUGH_FIELDS if k in s}, "pred": p.text,
             "answers": s["answers"]} for s, p in zip(samples, predictions)]
  result = metrics.score(task.metric, scored, dataset=task.name)
  row = {"task": task.name, "length": length, "method": predictor.name, "metric": task.metric,
         "score": result["score"], "num_samples": len(samples),
         "compression_ratio": _mean([p.compression_ratio for p in predictions]),
         "seconds_per_sample": seconds / max(len(samples), 1)}
  row.update({k: v for k, v in result.items() if k not in ("score", "per_sample")})
  records = [{"task": task.name, "length": length, "method": predictor.name, "id": s["id"],
              "depth": s["depth"], "score": value, "pred": p.text, "answers": s["answers"],
              "compression_ratio": p.compression_ratio}
             for s, p, value in zip(samples, predictions, result["per_sample"])]
  return row, records


def skipped_row(task: Any, length: int | None, method: str, num_samples: int, reason: Exception
                ) -> dict[str, Any]:
  """The row of a (task, length, method) that could not run: no score, and why."""
  return {"task": task.name, "length": length, "method": method, "metric": task.metric,
          "score": None, "num_samples": num_samples, "compression_ratio": None,
          "seconds_per_sample": None, "skipped": str(reason)}


def evaluate(tasks: Sequence[Any], lengths: Sequence[int], predictors: Sequence[Predictor], *,
             num_samples: int, batch_size: int, progress: bool = False) -> dict[str, Any]:
  """Every predictor on the same samples of every task at every length (once for unsized tasks).

  Returns `{"rows": [...], "samples": [...]}`: one row per (task, length, method) with score (0–100),
  num_samples, compression_ratio and seconds_per_sample (wall time of its batches, compilation of a new
  shape included), and one record per sample (prediction, answers, score in 0–1, NIAH depth). A
  method whose prompts exceed the decoder's window at a length gets a row with score None and the
  reason under `skipped`, and the evaluation goes on.
  """
  plan = [(task, length) for task in tasks for length in (lengths if task.sized else [None])]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    total = len(plan) * len(predictors) * num_samples if num_samples > 0 else None  # 0: all
    bar = tqdm.tqdm(total=total, unit="sample", desc="eval")
  rows, records = [], []
  try:
    for task, length in plan:
      samples = task.samples(length, num_samples)
      for predictor in predictors:
        if bar is not None:
          bar.set_postfix_str(f"{task.name} {length or ''} {predictor.name}")
        try:
          row, sample_records = run_one(task, length, samples, predictor, batch_size, bar)
        except errors.PromptTooLongError as error:
          # One method that cannot read this length must not cost the rows already scored.
          row, sample_records = skipped_row(task, length, predictor.name, len(samples), error), []
          (bar.write if bar is not None else print)(
              f"skipped {task.name} at {length} for {predictor.name}: {error}")
        rows.append(row)
        records += sample_records
  finally:
    if bar is not None:
      bar.close()
  return {"rows": rows, "samples": records}


def parse_tasks(spec: str, tokenizer: Any, seed: int, max_new_tokens: int = 0) -> list[Any]:
  """`eval.tasks`: comma-separated RULER task names (scored with RULER's metric) and `FILE.jsonl:METRIC`."""
  tasks = []
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, _, metric = item.rpartition(":") if ":" in item else (item, "", "")
    if ":" in item and name in ruler.TASKS:
      raise errors.ConfigError(f"eval.tasks: RULER task {name!r} takes no metric (RULER scores it with "
                       f"{metrics.ruler_metric_name(name)!r}); write {name!r} alone.")
    if item in ruler.TASKS:
      tasks.append(RulerTask(item, tokenizer, seed, max_new_tokens))
    elif name.endswith(".jsonl"):
      if metric not in metrics.METRICS:
        raise errors.ConfigError(f"eval.tasks: {item!r} needs a metric after the path, as "
                         f"{name}:METRIC with METRIC one of {sorted(metrics.METRICS)}.")
      tasks.append(JsonlTask(name, metric, max_new_tokens))
    else:
      raise errors.ConfigError(f"eval.tasks: {item!r} is neither a RULER task ({', '.join(ruler.TASKS)}) nor "
                       "FILE.jsonl:METRIC.")
  if not tasks:
    raise errors.ConfigError("eval.tasks is empty; name RULER tasks or FILE.jsonl:METRIC entries, comma-separated.")
  return tasks
