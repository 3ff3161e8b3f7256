"""Benchmark: peak host memory and time of exporting a 7B-shaped decoder (Llama-2-7B shapes, bf16).

Owns nothing but the measurement; ends with `export_peak_rss_gib=<peak resident memory>`.

The export's own tower writer (`hf.export.write_tower`) merges rank-8 LoRA into q/k/v/o and writes
sharded safetensors, reading each base tensor from a callback that draws it at random when asked, so
neither side ever holds the model (13.5 GB in bf16): peak memory should stay near one tensor plus
the interpreter. Peak RSS comes from `resource.getrusage`.

Usage: `python bench/export_memory.py [--layers 32] [--out DIR] [--max-shard-bytes 5000000000]`
(the output is deleted afterwards unless `--out` names a folder to keep).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_dtypes  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from e2llm_jax.hf import export  # pylint: disable=wrong-import-position
from e2llm_jax.hf.weight_names import decoder_weight_map  # pylint: disable=wrong-import-position
from e2llm_jax.models.llama import DecoderConfig  # pylint: disable=wrong-import-position

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32,
                 num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
                 bos_token_id=1, eos_token_id=2)
LORA_RANK, LORA_TARGETS = 8, ("q_proj", "k_proj", "v_proj", "o_proj")
GIB = 1 << 30


def peak_rss_bytes() -> int:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_lora(cfg: DecoderConfig, rng: np.random.Generator) -> dict:
  tree = {}
  for i in range(cfg.num_layers):
    attention = {}
    for name in LORA_TARGETS:  # all [hidden, hidden] in Llama-2-7B (no grouped-query attention)
      attention[name] = {
          "a": rng.normal(0, 0.02, (cfg.hidden_size, LORA_RANK)).astype(np.float32),
          "b": rng.normal(0, 0.02, (LORA_RANK, cfg.hidden_size)).astype(np.float32)}
    tree[f"layers_{i}"] = {"self_attn": attention}
  return tree


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--out", default=None, help="keep the export here (default: a temp folder)")
  parser.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
  args = parser.parse_args()
  cfg = DecoderConfig(num_layers=args.layers, dtype="bfloat16", **LLAMA2_7B)
  weight_map = decoder_weight_map(cfg)
  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def read(hf_name: str) -> np.ndarray:
    # Drawn in row blocks straight into bf16, so the source adds no float32 copy of a whole tensor.
    shape = weight_map[hf_name].hf_shape
    tensor = np.empty(shape, bf16)
    rows = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
    for first in range(0, shape[0], rows):
      block = tensor[first:first + rows]
      block[...] = rng.standard_normal(block.shape, dtype=np.float32) * np.float32(0.02)
    return tensor

  num_params = sum(int(np.prod(spec.hf_shape)) for spec in weight_map.values())
  folder = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="export7b"))
  rss_before = peak_rss_bytes()
  start = time.perf_counter()
  try:
    export.write_tower(folder, "decoder", cfg, read, random_lora(cfg, rng), lora_scale=2.0,
                       dtype="bfloat16", max_shard_bytes=args.max_shard_bytes)
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in folder.iterdir())
    shards = len(list(folder.glob("*.safetensors")))
  finally:
    if not args.out:
      shutil.rmtree(folder, ignore_errors=True)
  peak = peak_rss_bytes()
  print(f"decoder: {args.layers} layers, {num_params / 1e9:.2f}B params, bf16, LoRA r={LORA_RANK} "
        f"merged into {'/'.join(LORA_TARGETS)}")
  print(f"written: {written / GIB:.2f} GiB in {shards} shard(s), {seconds:.1f} s "
        f"({written / GIB / max(seconds, 1e-9):.2f} GiB/s)")
  print(f"peak RSS before export: {rss_before / GIB:.2f} GiB; after: {peak / GIB:.2f} GiB "
        f"(model size {num_params * 2 / GIB:.2f} GiB)")
  print(f"export_peak_rss_gib={peak / GIB:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
