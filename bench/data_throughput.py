"""Benchmark: input-pipeline examples/s at the demo's settings, against the demo's training rate.

Owns nothing but the measurement; ends with `data_examples_per_s=<steady-state rate>`.

Settings come from `configs/demo.py` (MiniLM encoder tokenizer, SmolLM2 GGUF decoder tokenizer, its
data sizes and task mixture; a `recon` share is added when the config has none, since training mixes
it in). `--train-examples-per-s` is the rate the demo's training step consumes examples at; its default
(1.0, from the demo config's estimate of "a few seconds a step" at batch 4) is a placeholder until the
training engineer measures it: pass the measured value. A ratio above 1 means the pipeline keeps up.

Usage: `python bench/data_throughput.py [--train-examples-per-s R] [--batches 30] [--threads 0,2]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # pylint: disable=wrong-import-position

from e2llm_jax import assets  # pylint: disable=wrong-import-position
from e2llm_jax.data import pipeline  # pylint: disable=wrong-import-position

PLACEHOLDER_TRAIN_EXAMPLES_PER_S = 1.0
DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
RECON_SHARE = 0.2


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", DEMO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def decoder_tokenizer():
  """SmolLM2's GGUF tokenizer (what the demo decodes with), else MiniLM's as a stand-in."""
  try:
    from e2llm_jax import hf  # pylint: disable=g-import-not-at-top
    return hf.load_tokenizer(assets.smollm2_gguf()), "smollm2-gguf"
  except (ImportError, AttributeError, FileNotFoundError) as error:
    print(f"SmolLM2 tokenizer unavailable ({error}); MiniLM stands in.", file=sys.stderr)
    return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir(), eos_token="[SEP]"), "minilm"


def measure(config, encoder_tokenizer, decoder, sources, threads, warmup, batches):
  config.data.num_threads = threads
  data = pipeline.make_pipeline(config, encoder_tokenizer, decoder, sources=sources,
                                process_index=0, process_count=1)
  for _ in range(warmup):
    next(data)
  start = time.perf_counter()
  chunks_cut = prompts_cut = 0
  for _ in range(batches):
    batch = next(data)
    chunks_cut += int((batch["chunks_dropped"] > 0).sum())
    prompts_cut += int((batch["prompt_tokens_dropped"] > 0).sum())
  elapsed = time.perf_counter() - start
  examples = batches * data.local_batch_size
  return examples / elapsed, chunks_cut / examples, prompts_cut / examples


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-examples-per-s", type=float, default=PLACEHOLDER_TRAIN_EXAMPLES_PER_S,
                      help="examples/s the demo's training step consumes (default: a placeholder "
                           f"{PLACEHOLDER_TRAIN_EXAMPLES_PER_S}; pass the measured value)")
  parser.add_argument("--batches", type=int, default=30, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--threads", default="0,2", help="comma-separated Grain thread counts; the "
                      "first one gives the final figure")
  parser.add_argument("--ruler-samples", type=int, default=64, help="in-memory samples per RULER task")
  args = parser.parse_args(argv)

  config = demo_config()
  tasks = dict(config.data.tasks)
  if "recon" not in tasks:
    tasks["recon"] = RECON_SHARE * sum(tasks.values()) / (1 - RECON_SHARE)
  config.data.tasks = tasks
  config.data.ruler_samples = args.ruler_samples
  encoder_tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())
  decoder, decoder_name = decoder_tokenizer()
  start = time.perf_counter()
  # Built once (RULER generation is start-up cost, not throughput) and shared by every setting.
  probe = pipeline.make_pipeline(config, encoder_tokenizer, decoder, process_index=0, process_count=1)
  sources = probe.sources
  print(f"sources ready in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{name}={len(src)}" for name, src in sorted(sources.items())))
  print(f"settings: batch={config.train.batch_size} chunk_tokens={config.data.chunk_tokens} "
        f"max_chunks={config.data.max_chunks} tasks={ {k: round(v, 3) for k, v in tasks.items()} } "
        f"decoder_tokenizer={decoder_name} cpus={os.cpu_count()}")
  rates = []
  for threads in [int(t) for t in args.threads.split(",")]:
    rate, chunks_cut, prompts_cut = measure(config, encoder_tokenizer, decoder, sources, threads,
                                            args.warmup, args.batches)
    rates.append(rate)
    print(f"threads={threads}: {rate:.1f} examples/s ({rate / config.train.batch_size:.1f} batches/s); "
          f"examples that lost chunks: {100 * chunks_cut:.0f}%, lost prompt tokens (data.prefix_tokens"
          f"/query_tokens too small): {100 * prompts_cut:.0f}%")
  ratio = rates[0] / args.train_examples_per_s
  placeholder = (" (placeholder rate; pass --train-examples-per-s)"
                 if args.train_examples_per_s == PLACEHOLDER_TRAIN_EXAMPLES_PER_S else "")
  print(f"demo training consumes {args.train_examples_per_s:.2f} examples/s{placeholder}; "
        f"pipeline/training = {ratio:.1f}x")
  print(f"data_examples_per_s={rates[0]:.1f}")


if __name__ == "__main__":
  main()
