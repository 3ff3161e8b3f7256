"""Benchmark: the inference engine with its LoRA merged into the towers' kernels, against kept apart.

Ends with `lora_merge_speedup=<seconds kept apart / seconds merged>` for one answer (compress, prefill
and decode together).

One process, real weights (MiniLM from `e2llm_jax.assets`, SmolLM2 from `_sides.decoder_folder`,
both float32) and the default config's LoRA (encoder rank 16 on query/key/value/attention output,
decoder rank 8 on q/k/v/o) with random non-zero `b`, as a trained run has. Two engines share these
arrays and differ only in `inference.merge_lora`; each answers one question about the first
`--length` tokens of the Paul Graham essays (`long_context.py`'s text) with `--new-tokens` greedy
tokens, once to compile, then `--rounds` times in alternating order. Medians per stage
(`E2LLM.last_timings`); the two engines' answers must be the same.

Usage: `python bench/lora_merge.py [--length 32768] [--new-tokens 32] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position
import long_context  # pylint: disable=wrong-import-position

QUESTION = "What is the main topic of the context?"
STAGES = ("compress_s", "prefill_s", "decode_s")


def engines(decoder_folder: str):
  """{merged: engine, apart: engine} over the same float32 towers and random trained-like LoRA."""
  import jax
  from e2llm_jax import assets, config_utils, towers
  from e2llm_jax.inference import E2LLM, loading
  from e2llm_jax.models import e2llm
  config = config_utils.base_config()
  config.model.encoder.path = str(assets.minilm_dir())
  config.model.decoder.path = decoder_folder
  config.model.pooling = "mean"
  config.data.chunk_tokens = long_context.CHUNK_TOKENS
  model, weights = towers.load_model(config)
  mesh = loading.default_mesh(config)
  frozen, _ = towers.frozen_towers(model, weights, mesh, config.mesh.rules, jax.random.key(0))
  trainable = e2llm.init_trainable(model, frozen, jax.random.key(1))
  # A trained run's b is not zero; with b = 0 the merged kernels would be the base ones and the
  # check that both engines answer alike would prove nothing.
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (jax.random.normal(jax.random.key(2), leaf.shape, leaf.dtype) * 1e-3
                          if path[-1].key == "b" else leaf), trainable)
  decoder_tok, encoder_tok = long_context.tokenizers()
  built = {}
  for name, merge in (("merged", True), ("apart", False)):
    engine_config = config.copy_and_resolve_references()
    engine_config.inference.merge_lora = merge
    built[name] = E2LLM.from_state(engine_config, model, frozen, trainable, encoder_tok,
                                   decoder_tok, mesh=mesh)
  return built


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  context = long_context.essay_context(args.length)[3]
  built = engines(str(_sides.decoder_folder()))
  answers, times = {}, {name: {stage: [] for stage in STAGES + ("total_s",)} for name in built}
  for name, engine in built.items():
    start = time.perf_counter()
    answers[name] = engine.generate(QUESTION, context, max_new_tokens=args.new_tokens)
    print(f"{name}: first answer (compiles included) {time.perf_counter() - start:.1f} s")
  if answers["merged"] != answers["apart"]:
    raise SystemExit(f"the engines answer differently: {answers}")
  for round_index in range(args.rounds):
    order = list(built) if round_index % 2 == 0 else list(built)[::-1]
    for name in order:
      start = time.perf_counter()
      built[name].generate(QUESTION, context, max_new_tokens=args.new_tokens)
      times[name]["total_s"].append(time.perf_counter() - start)
      for stage in STAGES:
        times[name][stage].append(built[name].last_timings[stage])
  median = {name: {stage: statistics.median(v) for stage, v in stages.items()}
            for name, stages in times.items()}
  print(f"{_sides.machine()}; length {args.length}, {args.new_tokens} new tokens, "
        f"{args.rounds} rounds, medians in s")
  print(f"{'':8}" + "".join(f"{stage:>12}" for stage in STAGES + ("total_s",)))
  for name in built:
    print(f"{name:8}" + "".join(f"{median[name][stage]:12.3f}" for stage in STAGES + ("total_s",)))
  print("answer:", repr(answers["merged"]))
  print(f"lora_merge_speedup={median['apart']['total_s'] / median['merged']['total_s']:.3f}")


if __name__ == "__main__":
  main()
