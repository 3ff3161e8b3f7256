"""Benchmark: the dense attention kernel over its batch in cache-sized groups against all at once.

Ends with `grouped_over_whole_<first shape>=<grouped forward+backward time / whole>`.

Both programs of each shape are compiled in one process and timed in alternating rounds, forward
alone and forward plus backward (`jax.vjp`), float32, random inputs with right padding (causal
for the decoder). The group is `dense_kernel.cache_group`, what `model.attention=auto`/`xla` takes
on a CPU; a shape it keeps whole is timed against itself.

Usage: `python bench/attention_kernel.py [--shapes minilm_train,minilm_infer,smollm2_train]
[--rounds 4] [--repeats 10]`.
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

# name → (batch, length, heads, kv heads, head dim, causal): the train step's MiniLM (4 × 16
# chunks), one inference group of MiniLM chunks, and the train step's SmolLM2 batch.
SHAPES = {"minilm_train": (64, 128, 12, 12, 32, False), "minilm_infer": (16, 128, 12, 12, 32, False),
          "smollm2_train": (4, 176, 9, 3, 64, True)}


def programs(shape: tuple) -> tuple[dict, int]:
  """({(kind, "whole"|"grouped"): (jitted function, its arguments)}, the group)."""
  import jax
  import jax.numpy as jnp
  from e2llm_jax.models import dense_kernel
  batch, length, heads, kv_heads, head_dim, causal = shape
  keys = jax.random.split(jax.random.key(0), 5)
  q, d_out = (jax.random.normal(keys[i], (batch, length, heads, head_dim)) for i in (0, 3))
  k, v = (jax.random.normal(keys[i], (batch, length, kv_heads, head_dim)) for i in (1, 2))
  lengths = jax.random.randint(keys[4], (batch,), length // 3, length + 1)
  mask = (jnp.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
  mask = jnp.broadcast_to(mask, (batch, 1, length, length))
  if causal:
    mask = mask & jnp.tril(jnp.ones((length, length), bool))
  group = dense_kernel.cache_group(q.shape, length)
  out = {}
  for name, g in (("whole", 0), ("grouped", group)):
    attend = lambda q, k, v, g=g: dense_kernel.dense_attention(q, k, v, mask, g)
    out["forward", name] = (jax.jit(attend), (q, k, v))
    out["forward+backward", name] = (
        jax.jit(lambda q, k, v, d, attend=attend: jax.vjp(attend, q, k, v)[1](d)), (q, k, v, d_out))
  return out, group


def timed_rounds(runs: dict, rounds: int, repeats: int) -> dict:
  """Median ms of each program over alternating rounds."""
  import jax
  calls = {key: (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
           for key, (fn, args) in runs.items()}
  times = _sides.alternating(calls, rounds, repeats)
  return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  names = args.shapes.split(",")
  print(f"# {_sides.machine()}; float32; {args.rounds} alternating rounds of {args.repeats}")
  print("shape group kind whole_ms grouped_ms grouped_over_whole")
  first = None
  for name in names:
    runs, group = programs(SHAPES[name])
    ms = timed_rounds(runs, args.rounds, args.repeats)
    for kind in ("forward", "forward+backward"):
      ratio = ms[kind, "grouped"] / ms[kind, "whole"]
      print(f"{name} {group} {kind} {ms[kind, 'whole']:.2f} {ms[kind, 'grouped']:.2f} {ratio:.3f}")
      if first is None and kind == "forward+backward":
        first = (name, ratio)
  print(f"grouped_over_whole_{first[0]}={first[1]:.3f}")


if __name__ == "__main__":
  main()
