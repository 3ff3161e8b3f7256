"""Shared by the benchmarks: each side runs in its own process, reports one JSON line, and its peak memory.

A side that runs out of memory, or past its step budget, is reported as such; the machine and date
go with every result.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

RESULT_PREFIX = "SIDE_RESULT "
# A side prints it when its model is built and its first step starts; `run_side` sets it in the
# side's environment, so that a side run on its own prints nothing.
READY_LINE = "SIDE_READY"
BENCH_CACHE = pathlib.Path(__file__).resolve().parent.parent / "workdirs" / "bench"
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "MemoryError", "out of memory", "Cannot allocate memory",
               "std::bad_alloc")


def peak_rss_mb() -> float:
  """This process's peak resident memory (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  """Median wall seconds of `repeats` calls of `fn` (which must block until its result exists)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def alternating(calls: dict, rounds: int, repeats: int) -> dict:
  """Wall seconds of `repeats` calls of each blocking call in `calls` (name → fn) per round, in one
  process: a warm-up call first in every round, the order reversed every other round."""
  times = {name: [] for name in calls}
  for round_index in range(rounds):
    order = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
    for name in order:
      calls[name]()
      times[name] += timed(calls[name], repeats)[1]
  return times


def emit(result: dict) -> None:
  """The side's result, with its peak memory, as the last line of its output."""
  result = dict(result, peak_rss_mb=round(peak_rss_mb(), 1))
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def ready() -> None:
  """Marks the start of a side's steps, from which `run_side`'s step budget counts."""
  if os.environ.get(READY_LINE):
    print(READY_LINE, flush=True)


def run_side(script: str, args: list[str], timeout_s: float, env: dict | None = None,
             step_budget_s: float | None = None) -> dict:
  """Run `script --side ...` in a fresh process; its JSON result, or {"oom"|"error"|"over_budget_s"}.

  With `step_budget_s`, a side still running that long after it printed `READY_LINE` (its steps,
  warm-up included, as opposed to loading) is stopped and reported as over the budget: PyTorch's
  bf16 step on a CPU without bf16 instructions took 218 s (bench/RESULTS.md).
  """
  command = [sys.executable, script, *args]
  with tempfile.TemporaryFile("w+", errors="replace") as stderr:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               errors="replace", env={**os.environ, **(env or {}), READY_LINE: "1"})
    lines, ready_at = [], []

    def read() -> None:
      for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(READY_LINE) and not ready_at:
          ready_at.append(time.monotonic())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    stopped = None
    while process.poll() is None:
      now = time.monotonic()
      if now > deadline:
        stopped = {"error": f"timeout after {timeout_s:.0f} s"}
      elif step_budget_s and ready_at and now - ready_at[0] > step_budget_s:
        stopped = {"over_budget_s": step_budget_s}
      if stopped:
        process.kill()
        process.wait()
        return stopped
      time.sleep(0.2)
    reader.join()
    stderr.seek(0)
    tail = stderr.read()[-2000:]
  for line in reversed(lines):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  if process.returncode in (-9, 137) or any(m in tail for m in OOM_MARKERS):
    return {"oom": True, "returncode": process.returncode}
  return {"error": f"exit {process.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


def decoder_folder() -> str:
  """SmolLM2's GGUF dequantized to float32 once, as a Hugging Face folder (our exporter, tested
  against transformers) that every side of a comparison loads; kept under `workdirs/bench/` for
  later runs, named by the GGUF's size and time so that a changed file is converted again.

  From the GGUF, transformers took 17 s a process to load it on a 2-core CPU (it parses the file's
  metadata twice), against 3 s from a folder; the conversion takes 8 s. Same float32 values.
  """
  from e2llm_jax import assets
  from e2llm_jax.hf import export, loading
  gguf = assets.smollm2_gguf()
  stat = gguf.stat()
  folder = BENCH_CACHE / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-float32"
  if not folder.is_dir():
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    cfg, read = loading.decoder_tensor_reader(gguf)
    export.write_tower(partial, "decoder", cfg, read)
    partial.rename(folder)  # complete or absent: an interrupted conversion is not taken as done
  return str(folder)


def machine() -> str:
  """CPU model, core count, date: the context every figure needs.

  The CPU family and model numbers go with the name because a virtual machine's name can be just
  "AMD EPYC" for generations whose float32 matmul rates differ twofold (bench/RESULTS.md).
  """
  model = platform.processor() or "unknown CPU"
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  if "model name" in fields:
    family, number = fields.get("cpu family", "?"), fields.get("model", "?")
    model = f"{fields['model name']} (family {family} model {number})"
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  return f"{model}, {os.cpu_count()} cores, {when}"


def fmt(result: dict, key: str, digits: int = 2) -> str:
  if result.get("oom"):
    return "OOM"
  if "over_budget_s" in result:
    return "over_budget" if key == "seconds" else "-"
  if "error" in result:
    return "error"
  value = result.get(key)
  return "-" if value is None else f"{value:.{digits}f}"
