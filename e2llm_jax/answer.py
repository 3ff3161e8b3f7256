"""Ask a trained E2LLM about a text file: `python -m e2llm_jax.answer --workdir W --context-file F --question Q`.

Prints the answer, the compression ratio and the seconds spent compressing, prefilling and decoding.
"""

import argparse
import pathlib
from typing import Sequence

from e2llm_jax import cli


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m e2llm_jax.answer",
      description="Compress a context with a trained E2LLM and answer a question about it.")
  parser.add_argument("--workdir", required=True, help="training run folder (config.json, "
                      "checkpoints/)")
  parser.add_argument("--context-file", required=True, help="UTF-8 text file: the context")
  parser.add_argument("--question", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--stop", action="append", default=None,
                      help="stop string (repeatable); the answer ends before it")
  parser.add_argument("--template", default=None,
                      help="prompt template name or literal with {context} (default: qa)")
  return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> None:
  args = parse_args(argv)
  text = pathlib.Path(args.context_file).read_text(encoding="utf-8")
  from e2llm_jax.inference import E2LLM  # late: argument errors stay fast

  engine = E2LLM.from_workdir(args.workdir, step=args.step)
  context = engine.compress(text)
  compress_s = engine.last_timings["compress_s"]
  answer = engine.generate(args.question, context, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           seed=args.seed, stop=args.stop, template=args.template)
  timings = engine.last_timings
  print(f"answer: {answer}")
  print(f"compression_ratio: {context.compression_ratio:.2f} ({context.num_context_tokens} context "
        f"tokens in {context.num_chunks} chunks -> {context.num_soft_tokens} soft tokens)")
  print(f"seconds: compress {compress_s:.3f}  prefill {timings['prefill_s']:.3f}  decode "
        f"{timings['decode_s']:.3f} ({int(timings['new_tokens'])} tokens; first calls include "
        "compilation)")


if __name__ == "__main__":
  cli.run(main)
