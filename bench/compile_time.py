"""Compile time of the paper config's train step from abstract shapes: no weights are made or loaded.

GTE-large + Llama-2-7B sizes (configs/paper_gte_llama2_7b.py's recipe: bf16, remat, LoRA, 256 chunks),
lowered and compiled for this machine's CPU, with the towers' layers scanned and unrolled.

Usage: `python bench/compile_time.py [--scan both|scanned|unrolled] [--batch 12] [--chunks 256]`.
Ends with `paper_compile_unrolled_over_scanned=<ratio>` (or the one side's seconds).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gpu_paper  # pylint: disable=wrong-import-position
import train_throughput  # pylint: disable=wrong-import-position


def compile_seconds(args, scanned: bool) -> dict:
  import jax
  from e2llm_jax import config_utils, sharding
  from e2llm_jax.training import state as state_lib
  from e2llm_jax.training import step as step_lib
  config = config_utils.paper_recipe(None)
  config.model.encoder.random_init = config_utils.random_tower(**gpu_paper.GTE_LARGE)
  config.model.decoder.random_init = config_utils.random_tower(**gpu_paper.LLAMA2_7B)
  config.model.scan_layers = scanned
  config.train.batch_size, config.data.max_chunks = args.batch, args.chunks
  config.mesh.shape = (1, 1, 1)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh, with_weights=False)  # frozen stays abstract
  s = dict(batch=args.batch, chunks=args.chunks, chunk_tokens=config.data.chunk_tokens,
           prefix=config.data.prefix_tokens, query=config.data.query_tokens,
           target=config.data.target_tokens)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       train_throughput.random_batch(s))
  step = step_lib.make_train_step(config, setup, batch)
  start = time.perf_counter()
  lowered = step.lower(setup.state, setup.frozen, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - start
  return {"lower_s": lower_s, "compile_s": compile_s, "total_s": lower_s + compile_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scan", choices=("both", "scanned", "unrolled"), default="both")
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--chunks", type=int, default=256)
  args = parser.parse_args()
  sides = ("unrolled", "scanned") if args.scan == "both" else (args.scan,)
  results = {}
  for side in sides:
    results[side] = compile_seconds(args, scanned=side == "scanned")
    r = results[side]
    print(f"{side}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
          f"total {r['total_s']:.1f} s", flush=True)
  if len(sides) == 2:
    print(f"paper_compile_unrolled_over_scanned="
          f"{results['unrolled']['total_s'] / results['scanned']['total_s']:.2f}")
  else:
    print(f"paper_compile_{sides[0]}_s={results[sides[0]]['total_s']:.1f}")


if __name__ == "__main__":
  main()
