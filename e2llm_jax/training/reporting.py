"""Run reports on process 0: DIR/metrics.jsonl, TensorBoard events (no TensorFlow), a progress bar.

Also DIR/config.json; a resumed run first drops the lines of steps after the restored checkpoint.
"""

import datetime
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "eval_metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
# DESIGN.md §4: every line of metrics.jsonl has these (plus `step`).
REQUIRED_METRICS = ("loss", "recon_loss", "ift_loss", "tokens_per_s")


def _plain(value: Any) -> Any:
  """A JSON-ready scalar: numpy / JAX scalars become Python numbers, non-finite floats None."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric values must be scalars, got shape {array.shape}")
  number = array.item()
  if isinstance(number, float) and not math.isfinite(number):
    return None  # NaN/inf are not JSON; a null loss is the visible sign of a bad step
  return number


def truncate_after(path: pathlib.Path, last_step: int) -> int:
  """Keep the lines of `path` with step <= last_step (and drop a torn last line); lines kept."""
  if not path.exists():
    return 0
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a crash
    if isinstance(record, dict) and isinstance(record.get("step"), int) and (
        record["step"] <= last_step):
      kept.append(line)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text("".join(line + "\n" for line in kept))
  os.replace(temporary, path)  # atomic: a crash here leaves the old or the new file, never half
  return len(kept)


class MetricsWriter:
  """Writes training and eval metrics; every method is a no-op except on process 0.

  `start_step` is the step the run starts from (the restored checkpoint's, or 0): lines and
  TensorBoard events of later steps, left by the interrupted run, are dropped so resumed runs never
  log a step twice.
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, *, start_step: int = 0,
               progress: bool | None = None, is_chief: bool | None = None):
    self.active = jax.process_index() == 0 if is_chief is None else is_chief
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.monotonic()
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # late: only process 0 needs it
    import tqdm

    self.workdir.mkdir(parents=True, exist_ok=True)
    for name in (METRICS_FILE, EVAL_METRICS_FILE):
      truncate_after(self.workdir / name, start_step)
    self._metrics = open(self.workdir / METRICS_FILE, "a")
    self._eval_metrics = open(self.workdir / EVAL_METRICS_FILE, "a")
    # purge_step hides events >= purge_step that an interrupted run wrote past the checkpoint.
    self._tensorboard = SummaryWriter(
        logdir=str(self.workdir / TENSORBOARD_DIR),
        purge_step=start_step + 1 if start_step > 0 else None, flush_secs=30)
    if progress is None:
      progress = sys.stderr.isatty()  # a bar in a log file is a wall of carriage returns
    self._progress = progress
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", disable=not progress,
                          dynamic_ncols=True, file=sys.stderr)

  def write_config(self, config: Any) -> None:
    """DIR/config.json: the resolved config (an ml_collections ConfigDict or a plain dict)."""
    if not self.active:
      return
    text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else (
        json.dumps(config, indent=2, sort_keys=True))
    (self.workdir / CONFIG_FILE).write_text(text + "\n")

  def write(self, step: int, metrics: Mapping[str, Any], tokens: int | None = None) -> dict:
    """Log training metrics of `step`; returns the JSON record (empty off process 0).

    `tokens`: tokens processed since the previous `write`, from which `tokens_per_s` is computed
    unless `metrics` has it. The first interval includes compilation time.
    """
    now = time.monotonic()
    elapsed = max(now - self._last_time, 1e-9)
    steps_done = step - self._last_step
    self._last_time, self._last_step = now, step
    if not self.active:
      return {}
    record = {"step": int(step)}
    record.update({name: _plain(value) for name, value in metrics.items()})
    if "tokens_per_s" not in record and tokens is not None:
      record["tokens_per_s"] = float(tokens) / elapsed
    missing = [name for name in REQUIRED_METRICS if name not in record]
    if missing:
      raise ValueError(f"metrics of step {step} lack {missing}; metrics.jsonl promises "
                       f"{list(REQUIRED_METRICS)} on every line")
    steps_per_s = steps_done / elapsed if steps_done > 0 else None
    record["steps_per_s"] = steps_per_s
    record["time"] = time.time()
    self._metrics.write(json.dumps(record) + "\n")
    self._metrics.flush()
    self._scalars("train", step, record)

    eta = (self.total_steps - step) / steps_per_s if steps_per_s else None
    if self._progress:
      self._bar.update(max(steps_done, 0))
      self._bar.set_postfix(loss=_short(record["loss"]), tok_s=_short(record["tokens_per_s"]),
                            refresh=False)
    else:
      eta_text = str(datetime.timedelta(seconds=round(eta))) if eta is not None else "?"
      print(f"step {step}/{self.total_steps}  loss {_short(record['loss'])}  recon "
            f"{_short(record['recon_loss'])}  ift {_short(record['ift_loss'])}  tokens/s "
            f"{_short(record['tokens_per_s'])}  eta {eta_text}", file=sys.stderr, flush=True)
    return record

  def write_eval(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Log evaluation metrics of `step` to DIR/eval_metrics.jsonl and TensorBoard `eval/`."""
    if not self.active:
      return {}
    record = {"step": int(step)}
    record.update({name: _plain(value) for name, value in metrics.items()})
    record["time"] = time.time()
    self._eval_metrics.write(json.dumps(record) + "\n")
    self._eval_metrics.flush()
    self._scalars("eval", step, record)
    return record

  def _scalars(self, prefix: str, step: int, record: Mapping[str, Any]) -> None:
    for name, value in record.items():
      if name in ("step", "time") or isinstance(value, (str, bool)) or value is None:
        continue
      self._tensorboard.add_scalar(f"{prefix}/{name}", value, global_step=step)

  def flush(self) -> None:
    if self.active:
      self._tensorboard.flush()

  def close(self) -> None:
    if not self.active or self._metrics.closed:
      return
    self._bar.close()
    self._tensorboard.close()
    self._metrics.close()
    self._eval_metrics.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _short(value: Any) -> str:
  if value is None:
    return "nan"
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value)
