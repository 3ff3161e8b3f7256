"""Profile: where our train step's time goes, by tower (encoder, decoder, rest) and direction.

Ends with `encoder_share=<encoder ops' share of the step's op time>`.

Runs `train_throughput.py`'s JAX side (same shapes and flags) once under `jax.profiler`, then maps
every traced XLA op to the source op of its HLO instruction (from an XLA dump of the optimized
module): forward ops sit under `jvp(...)`, backward ones under `transpose(jvp(...))`. Op times are
summed over XLA:CPU's worker threads, so they add up to more than the step's wall time.

Usage: `python bench/profile_step.py [--batch 4] [--chunks 16] [--dtype float32] [--top 25]`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="profile_step_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"
                           " --xla_dump_hlo_module_re=.*train_step.*")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_throughput  # pylint: disable=wrong-import-position

# A tower's ops name it as a path component: "jvp(Encoder)/...", or "jvp()/closed_call/Encoder/..."
# when its chunks run in groups (a loop inside a closed call).
TOWERS = (("encoder", re.compile(r"\bEncoder\b")), ("decoder", re.compile(r"\bDecoder\b")))


def source_ops(dump: str) -> dict[str, str]:
  """HLO instruction name → the op_name of its metadata, from the optimized module's text."""
  (path,) = pathlib.Path(dump).glob("*train_step*after_optimizations.txt")
  names = {}
  for line in path.read_text().splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if match:
      names[match.group(1)] = match.group(2).replace("jit(train_step)/", "")
  return names


def op_times(trace_dir: str) -> dict[str, float]:
  """Microseconds per traced XLA op (thunk) name, summed over its calls."""
  (path,) = pathlib.Path(trace_dir).rglob("*.trace.json.gz")
  times = collections.Counter()
  for event in json.load(gzip.open(path))["traceEvents"]:
    name = event.get("name", "")
    if event.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
      times[name] += event.get("dur", 0)
  return times


def main() -> None:
  import jax
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  train_throughput.add_shape_args(parser)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  s = train_throughput.shapes(args)
  config, setup, mesh = train_throughput.jax_setup(s, args.dtype)
  compiled, batch, _ = train_throughput.compile_train_step(config, setup, mesh,
                                                           train_throughput.random_batch(s))
  state = setup.state
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, setup.frozen, batch)
    jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp(prefix="profile_step_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    state, metrics = compiled(state, setup.frozen, batch)
    jax.block_until_ready(metrics)

  names, times = source_ops(DUMP), op_times(trace_dir)
  total = sum(times.values())
  by_part, by_op = collections.Counter(), collections.Counter()
  for op, micros in times.items():
    source = names.get(op, "<" + re.sub(r"\.\d+$", "", op) + ">")
    tower = next((t for t, marker in TOWERS if marker.search(source)), "rest")
    direction = "backward" if source.startswith("transpose(") else "forward"
    by_part[f"{tower} {direction}"] += micros
    readable = re.sub(r"(while/body|closed_call)/", "", source)
    by_op["/".join(readable.split("/")[:4])] += micros
  print(f"# {s}, {args.dtype}; op time {total / 1e6:.2f} s (summed over threads)")
  for part, micros in sorted(by_part.items()):
    print(f"{part:18s} {micros / 1e6:7.2f} s {100 * micros / total:5.1f}%")
  print(f"# top {args.top} source ops")
  for op, micros in by_op.most_common(args.top):
    print(f"{micros / 1e6:7.2f} s {100 * micros / total:5.1f}%  {op}")
  encoder = sum(v for k, v in by_part.items() if k.startswith("encoder"))
  print(f"encoder_share={encoder / total:.3f}")


if __name__ == "__main__":
  main()
