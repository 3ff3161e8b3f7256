"""Benchmark for one GPU: the paper's shapes (GTE-large + Llama-2-7B, random weights, bf16, LoRA).

Ends with `train_step_mfu=<required FLOPs / step time / the GPU's dense bf16 peak>`.

Measures (1) the MFU of the jitted train step (FLOPs counted as in `bench/roofline.py`, remat
recomputation not counted), and (2) long context: E2LLM time to first token and full-context
Llama-2-7B prefill at each `--lengths` (default 32k and 128k decoder tokens), reporting OOM as such.
Random weights: speed does not depend on their values. `bench/gpu.sh` runs it; `--tiny` shrinks every
shape so the code path can be checked on a CPU.

Usage: `python bench/gpu_paper.py [--batch 4] [--chunks 256] [--lengths 32768,131072]
[--peak-tflops 989] [--tiny]`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _sides  # pylint: disable=wrong-import-position
import roofline  # pylint: disable=wrong-import-position
import train_throughput  # pylint: disable=wrong-import-position

GTE_LARGE = dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                 intermediate_size=4096, max_position_embeddings=512)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                 intermediate_size=11008, max_position_embeddings=131072 + 1024)
TINY_ENCODER = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                    max_position_embeddings=512)
TINY_DECODER = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                    max_position_embeddings=131072 + 1024)


def paper_config(args):
  from e2llm_jax import config_utils
  config = config_utils.paper_recipe(None)
  config.model.encoder.random_init = config_utils.random_tower(
      **(TINY_ENCODER if args.tiny else GTE_LARGE))
  config.model.decoder.random_init = config_utils.random_tower(
      **(TINY_DECODER if args.tiny else LLAMA2_7B))
  config.model.pooling, config.lora.dropout = "mean", 0.0
  config.train.batch_size, config.data.max_chunks = args.batch, args.chunks
  config.mesh.shape = (1, 1, 1)
  return config


def train_step_mfu(args, config) -> dict:
  from e2llm_jax import sharding
  from e2llm_jax.training import state as state_lib
  s = dict(batch=args.batch, chunks=args.chunks, chunk_tokens=config.data.chunk_tokens,
           prefix=config.data.prefix_tokens, query=config.data.query_tokens,
           target=config.data.target_tokens)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  setup = state_lib.create_train_state(config, mesh)
  batch = train_throughput.random_batch(s)
  batch = {k: v % 1000 for k, v in batch.items()} if args.tiny else batch
  timing = train_throughput.time_train_step(config, setup, mesh, batch, args.steps,
                                            print_memory=True)
  seconds, compile_s = timing["seconds"], timing["compile_s"]
  flops = roofline.train_step_flops(setup.model.encoder, setup.model.decoder, s,
                                    config.lora.encoder_rank, config.lora.decoder_rank)
  return {"step_s": seconds, "compile_s": compile_s, "tflop_per_step": flops / 1e12,
          "mfu": flops / seconds / (args.peak_tflops * 1e12)}


def long_context(args, config, length: int) -> dict:
  """E2LLM first token (chunks → encoder → pool → adapter → decoder) and full-context prefill."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from e2llm_jax.models import bert, e2llm, llama
  from e2llm_jax import towers
  cfg, _ = towers.load_model(config)
  rng = jax.random.key(0)
  to_bf16 = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))
  frozen = {"encoder": to_bf16(bert.init_params(cfg.encoder, rng)),
            "decoder": to_bf16(llama.init_params(cfg.decoder, rng))}
  trainable = e2llm.init_trainable(cfg, frozen, rng)
  chunk_tokens = config.data.chunk_tokens
  num_chunks = length // chunk_tokens
  ids = np.random.default_rng(0).integers(5, 1000, (1, length)).astype(np.int32)
  # Weights are arguments of the jitted functions, never closed over (they would be constants).
  last = lambda decoder, embeds: jnp.argmax(llama.logits_from_hidden(cfg.decoder, decoder,
      llama.decoder_forward(cfg.decoder, decoder, inputs_embeds=embeds,
                            return_hidden=True)[:, -1:]), axis=-1)

  def e2llm_first(frozen, trainable, chunk_ids):
    soft = e2llm.soft_tokens(cfg, frozen, trainable, chunk_ids, jnp.ones_like(chunk_ids))
    question = llama.embed(cfg.decoder, frozen["decoder"], chunk_ids[0, :1, :64])
    return last(frozen["decoder"], jnp.concatenate([soft.astype(question.dtype), question], axis=1))

  def full_first(frozen, trainable, ids):
    del trainable
    return last(frozen["decoder"], llama.embed(cfg.decoder, frozen["decoder"], ids))

  result = {"length": length, "chunks": num_chunks}
  runs = (("e2llm", e2llm_first, ids.reshape(1, num_chunks, chunk_tokens)),
          ("full", full_first, ids))
  for name, fn, inputs in runs:
    try:
      args = (frozen, trainable, inputs)
      compiled = jax.jit(fn).lower(*args).compile()
      compiled(*args).block_until_ready()
      result[f"{name}_s"], _ = _sides.timed(lambda: compiled(*args).block_until_ready(), 3)
    except Exception as error:  # pylint: disable=broad-except
      oom = any(m in str(error) for m in _sides.OOM_MARKERS)
      result[f"{name}_s"] = "OOM" if oom else f"error: {str(error)[:200]}"
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--chunks", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lengths", default="32768,131072")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--out", default=None, help="folder for results.json")
  args = parser.parse_args()
  import jax
  print(f"# {jax.devices()}; {_sides.machine()}", flush=True)
  config = paper_config(args)
  results = {"train": train_step_mfu(args, config)}
  print(json.dumps(results["train"]), flush=True)
  results["long_context"] = []
  for length in (int(x) for x in args.lengths.split(",")):
    results["long_context"].append(long_context(args, config, length))
    print(json.dumps(results["long_context"][-1]), flush=True)
  if args.out:
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
  print(f"train_step_mfu={results['train']['mfu']:.3f}")


if __name__ == "__main__":
  main()
