"""Benchmark: our train step with its layers scanned (the default) against unrolled, per dtype.

Ends with `unrolled_over_scanned_step_<dtype>=<unrolled step time / scanned>` for the last dtype.

Both programs (`train_throughput.py`'s shapes and towers) are compiled in one process and timed in
alternating rounds. It also counts, in the scanned program, the dynamic-update-slice fusions that
convert a whole stack: XLA:CPU has no bfloat16 dynamic-update-slice, so a bf16 stack would be
converted to float32 and back by every layer instead of having one slice written (a quadratic
copy). `models/packing.py` carries the residuals as uint16 to avoid it; what the count still finds
are the norms' [1,1,hidden] scales.

Usage: `python bench/scan_layers.py [--dtypes float32,bfloat16] [--steps 5] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position
import train_throughput  # pylint: disable=wrong-import-position

VARIANTS = (("scanned", True), ("unrolled", False))


def whole_stack_converts(compiled) -> int:
  """Fusions of the compiled step that write a dynamic-update-slice through a convert."""
  return sum(1 for line in compiled.as_text().splitlines()
             if " = " in line and "dynamic-update-slice_convert_fusion" in line.split(" = ")[0])


def compare(s: dict, dtype: str, steps: int, rounds: int) -> dict:
  """Per layer layout: median step s, compile s, temporaries MB and whole-stack converts."""
  runs = {}
  for name, scan in VARIANTS:
    config, setup, mesh = train_throughput.jax_setup(s, dtype, scan_layers=scan)
    compiled, batch, compile_s = train_throughput.compile_train_step(
        config, setup, mesh, train_throughput.random_batch(s))
    runs[name] = {"one": train_throughput.stepper(compiled, setup, batch), "compile_s": compile_s,
                  "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                  "stack_converts": whole_stack_converts(compiled)}
  times = _sides.alternating({name: run.pop("one") for name, run in runs.items()}, rounds, steps)
  return {name: dict(seconds=statistics.median(times[name]), **run) for name, run in runs.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="float32,bfloat16")
  train_throughput.add_shape_args(parser)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--side-timeout", type=float, default=1800)
  parser.add_argument("--dtype", help=argparse.SUPPRESS)
  args = parser.parse_args()
  s = train_throughput.shapes(args)
  if args.dtype:
    _sides.emit(compare(s, args.dtype, args.steps, args.rounds))
    return
  print(f"# {_sides.machine()}; shapes {s}; {args.rounds} alternating rounds of {args.steps} steps")
  print("dtype layers step_s compile_s temp_MB stack_converts")
  ratio = None
  for dtype in args.dtypes.split(","):
    # Each dtype in its own process, with the host memory settings train.py gives it.
    result = _sides.run_side(__file__, ["--dtype", dtype, f"--rounds={args.rounds}",
                                        *train_throughput.shape_flags(args)],
                             args.side_timeout, env=train_throughput.train_env("jax", dtype))
    if "scanned" not in result:
      print(dtype, "failed:", result)
      continue
    for name, _ in VARIANTS:
      r = result[name]
      print(f"{dtype} {name} {r['seconds']:.3f} {r['compile_s']:.1f} {r['temp_mb']:.0f} "
            f"{r['stack_converts']}")
    ratio = (dtype, result["unrolled"]["seconds"] / result["scanned"]["seconds"])
  if ratio:
    print(f"unrolled_over_scanned_step_{ratio[0]}={ratio[1]:.3f}")


if __name__ == "__main__":
  main()
