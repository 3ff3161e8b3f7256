"""Benchmark: E2LLM's held-out RULER scores at each checkpoint of a curriculum's stages, against training.

Writes curve.json, curve.md and curve.png; ends with `learning_curve_final_mean=<last checkpoint's mean>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CURVE_JSON, CURVE_MD, CURVE_PNG = "curve.json", "curve.md", "curve.png"
LOSS_KEYS = ("recon_loss", "ift_loss")
# Settings every stage must share: the trainable params' shapes, and what the LoRA scale and the base
# towers make of them (base weights are also checked by fingerprint at each restore).
SHARED_MODEL_KEYS = ("model.encoder.random_init", "model.decoder.random_init", "model.pooling",
                     "model.tokens_per_chunk", "model.pma_heads", "model.adapter_hidden",
                     "lora.encoder_rank", "lora.decoder_rank", "lora.encoder_alpha",
                     "lora.decoder_alpha", "lora.encoder_targets", "lora.decoder_targets")
SAVE_IN_PROGRESS = "*.orbax-checkpoint-tmp*"  # an async save not yet renamed into its step folder
SAVE_WAIT_S = 600
SMOOTHING = 0.8  # EMA weight of the loss panel (TensorBoard's slider)


# -- Pure helpers: stage offsets, training time and losses from metrics.jsonl, the table. -----------

def stage_offsets(last_steps: Sequence[int], batch_sizes: Sequence[int],
                  last_seconds: Sequence[float | None]) -> list[tuple[int, int, float | None]]:
  """(cumulative step, examples, training seconds) where each stage starts: sums over those before it.

  A stage's `last_steps` entry is the step the next stage started from; seconds are None once unknown.
  """
  offsets, step, examples, seconds = [], 0, 0, 0.0
  for last, batch, stage_seconds in zip(last_steps, batch_sizes, last_seconds):
    offsets.append((step, examples, seconds))
    step, examples = step + int(last), examples + int(last) * int(batch)
    seconds = None if seconds is None or stage_seconds is None else seconds + stage_seconds
  return offsets


def training_seconds(records: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
  """[(step, seconds since the stage started)] from metrics.jsonl lines, starting at (0, 0).

  Each line covers the steps since the previous line: their count over its `steps_per_s` (so the gap
  between an interrupted session and its resume is not counted), else the difference of `time`.
  [] when a line has neither.
  """
  points, total, previous = [(0, 0.0)], 0.0, None
  for record in sorted(records, key=lambda r: r["step"]):
    done = record["step"] - (previous["step"] if previous else 0)
    if record.get("steps_per_s"):
      total += done / record["steps_per_s"]
    elif previous and previous.get("time") is not None and record.get("time") is not None:
      total += record["time"] - previous["time"]
    else:
      return []
    points.append((record["step"], total))
    previous = record
  return points


def value_at(points: Sequence[tuple[int, float]], step: int) -> float | None:
  """`points` (sorted by step) interpolated linearly at `step`, flat past the ends; None if empty."""
  if not points:
    return None
  if step <= points[0][0]:
    return points[0][1]
  for (left, low), (right, high) in zip(points, points[1:]):
    if step <= right:
      return low + (high - low) * (step - left) / max(right - left, 1)
  return points[-1][1]


def mean_near(records: Sequence[dict[str, Any]], key: str, step: int, window: int) -> float | None:
  """Mean of `key` over the logged steps in (step - window, step]; None when none logged it."""
  values = [r[key] for r in records
            if step - window < r["step"] <= step and r.get(key) is not None]
  return sum(values) / len(values) if values else None


def select_points(stage_steps: Sequence[Sequence[int]], offsets: Sequence[int], wanted: str
                  ) -> list[tuple[int, int, int]]:
  """(stage index, stage step, cumulative step) of each checkpoint asked for, by cumulative step.

  `wanted`: "all", or comma-separated cumulative steps, each one of the checkpoints.
  """
  available = sorted((offset + step, index, step) for index, (steps, offset)
                     in enumerate(zip(stage_steps, offsets)) for step in steps)
  if wanted.strip() == "all":
    return [(index, step, cumulative) for cumulative, index, step in available]
  by_cumulative = {cumulative: (index, step) for cumulative, index, step in available}
  asked = sorted({int(part) for part in wanted.split(",") if part.strip()})
  missing = [s for s in asked if s not in by_cumulative]
  if missing or not asked:
    raise SystemExit(f"--steps {wanted!r}: no checkpoint at cumulative steps {missing}; the "
                     f"checkpoints are at {sorted(by_cumulative)} (or pass --steps all).")
  return [(*by_cumulative[s], s) for s in asked]


def column_name(task: str, length: int | None) -> str:
  return f"{task}@{length}" if length else task


def mean_score(scores: dict[str, float | None]) -> float | None:
  known = [v for v in scores.values() if v is not None]
  return sum(known) / len(known) if known else None


def _cell(value: Any, digits: int) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:.{digits}f}"


def markdown_table(columns: Sequence[str], points: Sequence[dict[str, Any]],
                   baselines: Sequence[dict[str, Any]]) -> str:
  """One line per checkpoint (cumulative step, stage:step, examples, wall minutes, train losses, score
  per column, mean), then one line per baseline (scores only)."""
  head = ["step", "stage:step", "examples", "wall min", "recon", "ift", *columns, "mean"]
  lines = ["| " + " | ".join(head) + " |",
           "|---:|---|---:|---:|---:|---:|" + "---:|" * (len(columns) + 1)]
  for point in points:
    cells = [str(point["cumulative_step"]), f"{point['stage']}:{point['step']}",
             str(point["examples"]), _cell(point["wall_min"], 1), _cell(point["recon_loss"], 3),
             _cell(point["ift_loss"], 3)]
    cells += [_cell(point["scores"].get(c), 2) for c in columns] + [_cell(point["mean"], 2)]
    lines.append("| " + " | ".join(cells) + " |")
  for baseline in baselines:
    cells = [f"{baseline['method']} (baseline)", "", "", "", "", ""]
    cells += [_cell(baseline["scores"].get(c), 2) for c in columns] + [_cell(baseline["mean"], 2)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
  """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
  out, average = [], 0.0
  for count, value in enumerate(values, start=1):
    average = weight * average + (1 - weight) * value
    out.append(average / (1 - weight ** count))
  return out


# -- Stages: config, checkpoints and metrics of each workdir. -------------------------------------

def read_stages(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """Each workdir's config, checkpoint steps and metrics.jsonl lines, and where it starts on the
  cumulative axes; stops with a clear error when the stages do not share the model's shapes."""
  from e2llm_jax import config_utils  # pylint: disable=g-import-not-at-top
  from e2llm_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from e2llm_jax.training import reporting  # pylint: disable=g-import-not-at-top
  stages = []
  for number, workdir in enumerate(workdirs, start=1):
    path = pathlib.Path(workdir).expanduser().absolute()
    config = loading.read_config(path)
    steps = sorted(int(p.name) for p in (path / loading.CHECKPOINTS_DIR).glob("*")
                   if p.name.isdigit())
    if not steps:
      raise SystemExit(f"stage {number}: {str(path)!r} holds no checkpoint.")
    stages.append({"number": number, "workdir": path, "config": config, "steps": steps,
                   "records": logged_steps(path / reporting.METRICS_FILE)})
  first = stages[0]["config"]
  for stage in stages[1:]:
    differ = [key for key in SHARED_MODEL_KEYS
              if _plain(config_utils.get_path(stage["config"], key))
              != _plain(config_utils.get_path(first, key))]
    if differ:
      raise SystemExit(
          f"stage {stage['number']} ({stage['workdir']}) does not share the model of stage 1 "
          f"({stages[0]['workdir']}): " + "; ".join(
              f"{key} is {_plain(config_utils.get_path(stage['config'], key))!r} there, "
              f"{_plain(config_utils.get_path(first, key))!r} in stage 1" for key in differ)
          + ". A curriculum's stages must train the same trainable params.")
    source = stage["config"].train.get("init_from")
    previous = stages[stage["number"] - 2]["workdir"]
    if not source or pathlib.Path(source).expanduser().absolute() not in (
        previous, previous / loading.CHECKPOINTS_DIR):
      print(f"warning: stage {stage['number']}'s train.init_from is {source!r}, not the stage "
            f"before it ({previous}); its steps still count from that stage's last checkpoint.",
            file=sys.stderr)
  seconds = [training_seconds(s["records"]) for s in stages]
  offsets = stage_offsets([s["steps"][-1] for s in stages],
                          [int(s["config"].train.batch_size) for s in stages],
                          [value_at(points, s["steps"][-1]) if points else None
                           for s, points in zip(stages, seconds)])
  for stage, points, (step, examples, wall) in zip(stages, seconds, offsets):
    stage.update(first_step=step, first_example=examples, first_seconds=wall, seconds=points)
  return stages


def logged_steps(path: pathlib.Path) -> list[dict[str, Any]]:
  """The lines of a metrics.jsonl with a step; a line a live run is still writing is skipped."""
  records = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
  return records


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, "to_dict") else value


def describe_point(stage: dict[str, Any], step: int, loss_window: int) -> dict[str, Any]:
  """Where checkpoint `step` of `stage` sits on the cumulative axes, and the train losses near it."""
  wall = None
  if stage["first_seconds"] is not None and stage["seconds"]:
    wall = (stage["first_seconds"] + value_at(stage["seconds"], step)) / 60
  point = {"stage": stage["number"], "workdir": str(stage["workdir"]), "step": step,
           "cumulative_step": stage["first_step"] + step,
           "examples": stage["first_example"] + step * int(stage["config"].train.batch_size),
           "wall_min": wall}
  point.update({key: mean_near(stage["records"], key, step, loss_window) for key in LOSS_KEYS})
  return point


def wait_for_saves(checkpoints: pathlib.Path) -> None:
  """Wait while a live run is writing a checkpoint here: opening a Checkpointer clears unfinished
  save folders, which would cost that run its save."""
  deadline = time.monotonic() + SAVE_WAIT_S
  while any(checkpoints.glob(SAVE_IN_PROGRESS)) and time.monotonic() < deadline:
    time.sleep(2)


# -- Scoring. -------------------------------------------------------------------------------------

def score(plan: Sequence[tuple[Any, Any, list]], predictor: Any, batch_size: int
          ) -> tuple[dict[str, float | None], list[dict], list[dict]]:
  """(score per column, runner rows, per-sample records) of one predictor on the fixed samples."""
  from e2llm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  scores, rows, records = {}, [], []
  for task, length, samples in plan:
    row, sample_records = runner.run_one(task, length, samples, predictor,
                                         min(batch_size, len(samples)))
    scores[column_name(task.name, length)] = row["score"]
    rows.append(row)
    records += sample_records
  return scores, rows, records


def plot(points: Sequence[dict], baselines: Sequence[dict], stages: Sequence[dict],
         columns: Sequence[str], path: pathlib.Path) -> None:
  """Score against cumulative step per column (baselines dashed), and the smoothed train losses."""
  from e2llm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  plt = report._pyplot()  # pylint: disable=protected-access  # matplotlib on Agg
  figure, (scores_panel, loss_panel) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  dashes = ["--", ":", "-."]
  steps = [p["cumulative_step"] for p in points]
  for index, column in enumerate(columns):
    color = colors[index % len(colors)]
    scores_panel.plot(steps, [p["scores"].get(column) for p in points], marker="o", color=color,
                      label=column)
    for number, baseline in enumerate(baselines):
      value = baseline["scores"].get(column)
      if value is not None:
        scores_panel.axhline(value, color=color, linestyle=dashes[number % len(dashes)],
                             linewidth=1, label=f"{column} {baseline['method']}")
  scores_panel.plot(steps, [p["mean"] for p in points], color="black", linewidth=2, label="mean")
  scores_panel.set_ylim(-3, 103)
  scores_panel.set_ylabel("held-out score (0–100)")
  scores_panel.legend(fontsize=7, ncol=2)
  for key, color in zip(LOSS_KEYS, ("tab:purple", "tab:green")):
    for number, stage in enumerate(stages):
      logged = sorted((r["step"], r[key]) for r in stage["records"] if r.get(key) is not None)
      if not logged:
        continue
      x = [stage["first_step"] + s for s, _ in logged]
      loss_panel.plot(x, [v for _, v in logged], color=color, alpha=0.25, linewidth=1)
      loss_panel.plot(x, smoothed([v for _, v in logged]), color=color,
                      marker="." if len(logged) < 20 else None, label=key if number == 0 else None)
  for stage in stages[1:]:
    for panel in (scores_panel, loss_panel):
      panel.axvline(stage["first_step"], color="gray", linestyle=":", linewidth=1)
  loss_panel.set_ylabel(f"train loss (EMA {SMOOTHING})")
  loss_panel.set_xlabel("cumulative training step (dotted: next stage)")
  loss_panel.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def write(out: pathlib.Path, summary: dict[str, Any], stages: Sequence[dict], plot_too: bool
          ) -> str:
  """curve.json and curve.md (and curve.png when `plot_too`); returns the table."""
  table = markdown_table(summary["columns"], summary["points"], summary["baselines"])
  (out / CURVE_JSON).write_text(json.dumps(summary, indent=1, default=str))
  notes = [f"Held-out E2LLM scores (0–100) of each checkpoint on {summary['settings']['num_samples']} "
           f"fresh RULER samples per task and length (seed {summary['settings']['seed']}), the same "
           "for every step. step: cumulative over the stages; examples: step × each stage's batch "
           f"size; wall min: training time to that step; recon / ift: mean train loss over the "
           f"{summary['loss_window']} steps before it (metrics.jsonl)."]
  if summary["baselines"]:
    at = summary["baselines"][0]["at"]
    notes.append(f"Baselines are scored once, with the decoder LoRA of stage {at['stage']} step "
                 f"{at['step']} (as eval.py scores them).")
  (out / CURVE_MD).write_text("# Learning curve\n\n" + table + "\n" + "\n\n".join(notes)
                              + f"\n\n![curve]({CURVE_PNG})\n")
  if plot_too:
    plot(summary["points"], summary["baselines"], stages, summary["columns"], out / CURVE_PNG)
  return table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdirs", required=True,
                      help="the curriculum's run folders in order, comma-separated")
  parser.add_argument("--tasks", default="niah_single_1,niah_single_2,qa_1",
                      help="as eval.tasks: RULER names (and FILE.jsonl:METRIC)")
  parser.add_argument("--lengths", default="4096", help="RULER context lengths, decoder tokens")
  parser.add_argument("--num-samples", type=int, default=8, help="per task and length")
  parser.add_argument("--baselines", default="none", help="of full,none,rag; '' for none at all")
  parser.add_argument("--seed", type=int, default=7,
                      help="held-out stream seed; not the run's, so the samples are not those its "
                           "in-training evaluation saw")
  parser.add_argument("--steps", default="all", help="'all' or comma-separated cumulative steps")
  parser.add_argument("--batch-size", type=int, default=8, help="samples per engine call")
  parser.add_argument("--max-new-tokens", type=int, default=0, help="0: RULER's budget per task")
  parser.add_argument("--loss-window", type=int, default=25,
                      help="train losses in the table: mean over this many steps up to the point")
  parser.add_argument("--out", required=True, help="a curve.json already here with the same "
                      "settings is kept: only checkpoints it lacks are scored")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from e2llm_jax import checkpoint, towers  # pylint: disable=g-import-not-at-top
  from e2llm_jax.evaluation import predictors, runner  # pylint: disable=g-import-not-at-top
  from e2llm_jax.inference import E2LLM, loading  # pylint: disable=g-import-not-at-top

  stages = read_stages([w for w in args.workdirs.split(",") if w.strip()])
  chosen = select_points([s["steps"] for s in stages], [s["first_step"] for s in stages], args.steps)
  lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
  baseline_names = [b.strip() for b in args.baselines.split(",") if b.strip()]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  settings = {"workdirs": [str(s["workdir"]) for s in stages], "tasks": args.tasks,
              "lengths": lengths, "num_samples": args.num_samples, "seed": args.seed,
              "max_new_tokens": args.max_new_tokens}
  previous = json.loads((out / CURVE_JSON).read_text()) if (out / CURVE_JSON).is_file() else {}
  if previous.get("settings") != settings:
    previous = {}  # other samples: nothing to reuse
  done = {(p["workdir"], p["step"]): p for p in previous.get("points", [])}
  if done:
    print(f"reusing the {len(done)} points of {out / CURVE_JSON} (same settings); delete it to "
          "score them again", file=sys.stderr)

  last = stages[-1]
  wait_for_saves(last["workdir"] / loading.CHECKPOINTS_DIR)
  start = time.perf_counter()
  engine = E2LLM.from_workdir(str(last["workdir"]))
  if engine.examples is None:
    raise SystemExit("the run has random-init towers (no tokenizers): RULER needs text; score "
                     "passkey runs with eval.py.")
  base_weights = checkpoint.base_weights_meta(
      {name: path or None for name, path in towers.base_paths(engine.config).items()})
  plan = [(task, length, task.samples(length, args.num_samples))
          for task in runner.parse_tasks(args.tasks, engine.decoder_tokenizer, args.seed,
                                         args.max_new_tokens)
          for length in (lengths if task.sized else [None])]
  columns = [column_name(task.name, length) for task, length, _ in plan]
  print(f"engine and {sum(len(s) for _, _, s in plan)} samples ready in "
        f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

  e2llm_predictor, *baseline_predictors = predictors.make_predictors(
      engine, baseline_names, int(engine.config.model.tokens_per_chunk))
  at = {"stage": last["number"], "workdir": str(last["workdir"]), "step": int(engine.step)}
  baselines = [b for b in previous.get("baselines", []) if b["at"] == at]
  for predictor in baseline_predictors:
    if any(b["method"] == predictor.name for b in baselines):
      continue
    began = time.perf_counter()
    scores, rows, _ = score(plan, predictor, args.batch_size)
    baselines.append({"method": predictor.name, "at": at, "scores": scores,
                      "mean": mean_score(scores), "rows": rows,
                      "seconds": time.perf_counter() - began})
    print(f"baseline {predictor.name}: mean {_cell(baselines[-1]['mean'], 2)} "
          f"[{baselines[-1]['seconds']:.0f} s]", file=sys.stderr, flush=True)
  baselines = [b for name in baseline_names for b in baselines if b["method"] == name]

  summary = {"settings": settings, "columns": columns, "loss_window": args.loss_window,
             "stages": [{"stage": s["number"], "workdir": str(s["workdir"]),
                         "batch_size": int(s["config"].train.batch_size),
                         "checkpoints": s["steps"], "first_step": s["first_step"],
                         "first_example": s["first_example"],
                         "first_wall_min": None if s["first_seconds"] is None
                         else s["first_seconds"] / 60} for s in stages],
             "baselines": baselines, "points": []}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          engine.trainable)
  with contextlib.ExitStack() as opened:
    readers = {}
    for index, step, cumulative in chosen:
      stage = stages[index]
      point = describe_point(stage, step, args.loss_window)
      if (point["workdir"], step) in done:
        summary["points"].append({**done[(point["workdir"], step)], **point})
        continue
      began = time.perf_counter()
      if index not in readers:
        wait_for_saves(stage["workdir"] / loading.CHECKPOINTS_DIR)
        readers[index] = opened.enter_context(checkpoint.Checkpointer(
            stage["workdir"] / loading.CHECKPOINTS_DIR, 1, 1 << 30, async_save=False))
      engine.trainable = None  # the previous step's params go before the next ones are read
      engine.trainable, meta, _ = readers[index].restore_params(step, abstract)
      checkpoint.check_fingerprints(meta, base_weights)
      restored = time.perf_counter()
      scores, rows, records = score(plan, e2llm_predictor, args.batch_size)
      point.update(scores=scores, mean=mean_score(scores), rows=rows, samples=records,
                   restore_s=restored - began, score_s=time.perf_counter() - restored)
      summary["points"].append(point)
      summary["points"].sort(key=lambda p: p["cumulative_step"])
      write(out, summary, stages, plot_too=False)  # a stopped run keeps what it measured
      print(f"step {cumulative} (stage {stage['number']} step {step}): mean "
            f"{_cell(point['mean'], 2)} [{point['restore_s']:.0f} s restore, "
            f"{point['score_s']:.0f} s scoring]", file=sys.stderr, flush=True)
  table = write(out, summary, stages, plot_too=True)
  print(table)
  print("\n".join(f"{name}: {out / name}" for name in (CURVE_JSON, CURVE_MD, CURVE_PNG)))
  final = summary["points"][-1]["mean"] if summary["points"] else None
  print(f"learning_curve_final_mean={_cell(final, 2)}")


if __name__ == "__main__":
  main()
