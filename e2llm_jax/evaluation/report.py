"""Evaluation reports: results JSON, per-sample predictions JSONL, a markdown table, and PNG plots.

Plots (matplotlib, Agg): score against context length per task and method; a NIAH depth × length heatmap.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
SCORE_PLOT = "score_vs_length.png"
DEPTH_HEATMAP = "niah_depth_heatmap.png"
DEPTH_BUCKETS = 10  # depth rows of the heatmap: 0–10 %, ..., 90–100 %


def _number(value: Any, digits: int) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:.{digits}f}"


def mean_score(rows: Sequence[dict[str, Any]], method: str, length: int | None) -> float | None:
  """`method`'s mean score over the tasks scored at `length` (None when none was: see `skipped`)."""
  scores = [r["score"] for r in rows
            if r["method"] == method and r["length"] == length and r["score"] is not None]
  return sum(scores) / len(scores) if scores else None


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per (task, length, method), then each method's mean score at each length."""
  lines = ["| task | length | method | metric | score | compression | s / sample | samples |",
           "|---|---:|---|---|---:|---:|---:|---:|"]
  for row in rows:
    ratio = row["compression_ratio"]
    lines.append(f"| {row['task']} | {row['length'] or '–'} | {row['method']} | {row['metric']} | "
                 f"{_number(row['score'], 2)} | {_number(ratio, 1) + 'x' if ratio else '–'} | "
                 f"{_number(row['seconds_per_sample'], 2)} | {row['num_samples']} |")
  methods = list(dict.fromkeys(r["method"] for r in rows))
  lengths = list(dict.fromkeys(r["length"] for r in rows))
  if len(rows) > len(methods):
    lines += ["", "Mean score over tasks:", "",
              "| method | " + " | ".join(str(n or "–") for n in lengths) + " |",
              "|---|" + "---:|" * len(lengths)]
    for method in methods:
      cells = [_number(mean_score(rows, method, length), 2) for length in lengths]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
  skipped = [r for r in rows if r.get("skipped")]
  if skipped:
    lines += ["", "Not scored:", ""] + [f"- {r['task']} at {r['length']} for {r['method']}: "
                                        f"{r['skipped']}" for r in skipped]
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display: files only
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_scores(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> pathlib.Path | None:
  """Score against context length, one panel per task, one line per method (tasks with lengths)."""
  sized = [r for r in rows if r["length"] is not None and r["score"] is not None]
  if not sized:
    return None
  plt = _pyplot()
  task_names = list(dict.fromkeys(r["task"] for r in sized))
  columns = min(len(task_names), 3)
  figure_rows = math.ceil(len(task_names) / columns)
  figure, axes = plt.subplots(figure_rows, columns, figsize=(4.5 * columns, 3.5 * figure_rows),
                              squeeze=False)
  for panel, task in zip(axes.flat, task_names):
    for method in dict.fromkeys(r["method"] for r in sized):
      points = sorted((r["length"], r["score"]) for r in sized
                      if r["task"] == task and r["method"] == method)
      panel.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    panel.set_title(task)
    panel.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in sized if r["task"] == task})
    panel.set_xticks(lengths, [str(n) for n in lengths])
    panel.minorticks_off()
    panel.set_xlabel("context length (decoder tokens)")
    panel.set_ylabel("score")
    panel.set_ylim(-2, 102)
    panel.legend(fontsize="small")
  for panel in list(axes.flat)[len(task_names):]:
    panel.axis("off")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def depth_grid(samples: Sequence[dict[str, Any]], method: str
               ) -> tuple[list[int], list[list[float | None]]]:
  """(lengths, grid[depth bucket][length] of mean score in 0–100) over NIAH samples of `method`."""
  chosen = [s for s in samples if s["method"] == method and s["depth"] is not None
            and s["length"] is not None]
  lengths = sorted({s["length"] for s in chosen})
  sums = [[[0.0, 0] for _ in lengths] for _ in range(DEPTH_BUCKETS)]
  for s in chosen:
    bucket = min(int(s["depth"] * DEPTH_BUCKETS / 100), DEPTH_BUCKETS - 1)
    cell = sums[bucket][lengths.index(s["length"])]
    cell[0] += 100 * s["score"]
    cell[1] += 1
  return lengths, [[total / count if count else None for total, count in row] for row in sums]


def plot_depth_heatmap(samples: Sequence[dict[str, Any]], path: pathlib.Path) -> pathlib.Path | None:
  """NIAH score by needle depth (rows) and context length (columns), one panel per method."""
  methods = list(dict.fromkeys(s["method"] for s in samples if s["depth"] is not None))
  if not methods:
    return None
  plt = _pyplot()
  import numpy as np  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods) + 2, 4), squeeze=False,
                              sharey=True)
  image = None
  for panel, method in zip(axes.flat, methods):
    lengths, grid = depth_grid(samples, method)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], float)
    image = panel.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    panel.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    panel.set_title(method)
    panel.set_xlabel("context length")
  step = 100 // DEPTH_BUCKETS
  axes.flat[0].set_yticks(range(DEPTH_BUCKETS),
                          [f"{i * step}–{(i + 1) * step}%" for i in range(DEPTH_BUCKETS)])
  axes.flat[0].set_ylabel("needle depth")
  figure.colorbar(image, ax=list(axes.flat), label="score")
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def write(results: dict[str, Any], out_dir: str | pathlib.Path, extra: dict[str, Any] | None = None
          ) -> dict[str, pathlib.Path]:
  """results.json, predictions.jsonl, report.md and the PNGs under `out_dir`; returns what was written."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = {"results": out / RESULTS_FILE, "predictions": out / PREDICTIONS_FILE,
             "report": out / REPORT_FILE}
  written["results"].write_text(json.dumps({**(extra or {}), "rows": results["rows"]}, indent=2))
  with written["predictions"].open("w", encoding="utf-8") as lines:
    for sample in results["samples"]:
      lines.write(json.dumps(sample, ensure_ascii=False) + "\n")
  table = markdown_table(results["rows"])
  plots = {"score_plot": plot_scores(results["rows"], out / SCORE_PLOT),
           "depth_heatmap": plot_depth_heatmap(results["samples"], out / DEPTH_HEATMAP)}
  written.update({k: v for k, v in plots.items() if v is not None})
  notes = ["", "Scores are on each benchmark's 0–100 scale. Compression = context tokens / decoder "
           "tokens read for it (soft tokens for e2llm, kept text for full and rag; none reads no "
           "context). Seconds per sample include compiling each new shape.", ""]
  notes += [f"![{name}]({path.name})" for name, path in plots.items() if path is not None]
  written["report"].write_text("# Evaluation\n\n" + table + "\n".join(notes) + "\n")
  return written
