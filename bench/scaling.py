"""Benchmark: how our train step's time grows with the number of chunks (8, 32, 128 by default).

Ends with `growth_128_over_8=<step time at the most chunks / at the fewest>` (16x the chunks: linear is 16).

The step is the one `bench/train_throughput.py` times (real MiniLM + SmolLM2, LoRA on both, mean
pooling), at batch 1; each chunk count runs in its own process, and its median step time counts.

Usage: `python bench/scaling.py [--chunk-counts 8,32,128] [--dtype float32] [--steps 3]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position
import train_throughput  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunk-counts", default="8,32,128")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--side-timeout", type=float, default=1800)
  args = parser.parse_args()
  script = str(pathlib.Path(__file__).resolve().parent / "train_throughput.py")
  counts = [int(x) for x in args.chunk_counts.split(",")]
  print(f"# {_sides.machine()}; dtype {args.dtype}, batch 1, 128-token chunks")
  print("chunks step_s tokens_per_s compile_s peak_MB")
  seconds = {}
  for count in counts:
    result = _sides.run_side(script, ["--side", "jax", "--dtype", args.dtype, "--batch=1",
                                      f"--chunks={count}", f"--steps={args.steps}"],
                             args.side_timeout, env=train_throughput.train_env("jax", args.dtype))
    if "seconds" in result:
      seconds[count] = result["seconds"]
    print(f"{count} {_sides.fmt(result, 'seconds', 3)} {_sides.fmt(result, 'tokens_per_s', 0)} "
          f"{_sides.fmt(result, 'compile_s', 1)} {_sides.fmt(result, 'peak_rss_mb', 0)}", flush=True)
  low, high = min(counts), max(counts)
  growth = seconds[high] / seconds[low] if low in seconds and high in seconds else float("nan")
  print(f"growth_{high}_over_{low}={growth:.2f}")


if __name__ == "__main__":
  main()
