"""Benchmark: our train step's achieved FLOP rate as a fraction of the dense matmul rate measured in the same run.

Ends with `fraction_of_peak=<required FLOPs / step time / matmul FLOP/s>`.

Required FLOPs are counted analytically from the model's shapes, matmuls only (2·m·k·n each):
- forward: every projection of both towers (attention q/k/v/o, MLP), the LoRA factors, the
  adapter, attention scores and weighted values (the encoder over all T keys, the decoder over the
  causal half: (S+1)/2 keys on average), and the output head only at the target tokens;
- backward: the gradient with respect to activations of everything above (same FLOPs as its
  forward; twice for attention, which has two inputs that need gradients), plus weight gradients
  for the trainable weights only (LoRA factors, adapter); frozen base weights get none.
Norms, softmax, activations and the optimizer are not counted. The "peak" is a 2048² matmul
through `layers.matmul`, the product every projection of ours calls (in bfloat16 on a CPU: bf16
operands accumulated in float32, 2-3x the rate of a bf16 -> bf16 dot), on this machine, measured
before and after the step (the faster).

Usage: `python bench/roofline.py [--dtype float32] [--batch 4] [--chunks 16] [--steps 5]`.
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

MATMUL_SIZE = 2048


def matmul_flops_per_s(dtype: str, repeats: int = 5, size: int = MATMUL_SIZE) -> float:
  import jax
  from e2llm_jax.models import layers
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  f = jax.jit(layers.matmul)
  f(a, a).block_until_ready()
  seconds, _ = _sides.timed(lambda: f(a, a).block_until_ready(), repeats)
  return 2 * size ** 3 / seconds


def train_step_flops(enc, dec, s: dict, encoder_rank: int, decoder_rank: int) -> float:
  """Required matmul FLOPs of one train step (see the module docstring)."""
  b, n, t = s["batch"], s["chunks"], s["chunk_tokens"]
  enc_tokens = b * n * t
  dec_len = s["prefix"] + n + s["query"] + s["target"]
  dec_tokens = b * dec_len
  e, i = enc.hidden_size, enc.intermediate_size
  enc_frozen = enc.num_layers * enc_tokens * 2 * (4 * e * e + 2 * e * i)
  enc_attention = enc.num_layers * enc_tokens * 2 * 2 * t * e
  enc_lora = enc.num_layers * enc_tokens * 2 * 4 * (2 * e * encoder_rank)
  d, inter = dec.hidden_size, dec.intermediate_size
  q_width, kv_width = dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
  dec_frozen = dec.num_layers * dec_tokens * 2 * (2 * d * q_width + 2 * d * kv_width
                                                  + 3 * d * inter)
  dec_attention = dec.num_layers * dec_tokens * 2 * 2 * ((dec_len + 1) / 2) * q_width
  dec_lora = dec.num_layers * dec_tokens * 2 * decoder_rank * (2 * (d + q_width)
                                                               + 2 * (d + kv_width))
  adapter = b * n * 2 * (e * d + d * d)
  head = b * s["target"] * 2 * d * dec.vocab_size
  frozen = enc_frozen + dec_frozen + head
  attention = enc_attention + dec_attention
  trainable = enc_lora + dec_lora + adapter
  # forward + activation gradients (x1 frozen, x2 attention) + weight gradients (trainable only)
  return 2 * frozen + 3 * attention + 3 * trainable


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  train_throughput.add_shape_args(parser)
  args = parser.parse_args()
  from e2llm_jax import host_memory
  host_memory.restart_with_huge_pages(args.dtype)  # the step as train.py runs it
  from e2llm_jax import assets, hf
  s = train_throughput.shapes(args)
  enc, _ = hf.load_encoder(str(assets.minilm_dir()))
  dec, _ = hf.load_decoder(str(assets.smollm2_gguf()))
  flops = train_step_flops(enc, dec, s, train_throughput.ENCODER_LORA,
                           train_throughput.DECODER_LORA)
  before = matmul_flops_per_s(args.dtype)
  step = train_throughput.jax_side(s, args.dtype, args.steps)
  after = matmul_flops_per_s(args.dtype)
  peak = sorted([before, after])[1]  # the faster of the two: the machine's rate when not disturbed
  achieved = flops / step["seconds"]
  print(f"# {_sides.machine()}; shapes {s}; dtype {args.dtype}")
  print(f"required_tflop_per_step={flops / 1e12:.3f} step_s={step['seconds']:.3f} "
        f"achieved_gflop_s={achieved / 1e9:.1f} matmul_gflop_s_before={before / 1e9:.1f} "
        f"after={after / 1e9:.1f}")
  print(f"fraction_of_peak={achieved / peak:.3f}")


if __name__ == "__main__":
  main()
