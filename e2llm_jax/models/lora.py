"""LoRA as a separate trainable tree beside frozen base params: create, scale, merge, count.

A tree mirrors the param tree at every targeted Dense: `{"a": [in, r], "b": [r, out]}` (with a leading
layers axis in a scanned tower); `b` starts at zero.
"""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int
  alpha: float
  targets: str  # regex matched (re.search) against "/"-joined module paths, e.g. "q_proj|v_proj"
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_paths(params: Any, targets: str) -> list[tuple[str, ...]]:
  """Module paths (tuples) of the Dense kernels whose "/"-joined path matches `targets`."""
  pattern = re.compile(targets)
  flat = traverse_util.flatten_dict(params)
  return [path[:-1] for path, leaf in flat.items()
          if path[-1] == "kernel" and getattr(leaf, "ndim", 0) in (2, 3)
          and pattern.search("/".join(path[:-1]))]


def init(rng: jax.Array, params: Any, config: LoRAConfig, dtype=jnp.float32) -> dict:
  """A fresh LoRA tree: `a` ~ Kaiming-uniform as PEFT does, `b` = 0, so the model equals its base."""
  paths = target_paths(params, config.targets)
  if not paths:
    raise ValueError(f"LoRA targets {config.targets!r} match no Dense kernel; module paths look "
                     f"like {['/'.join(p[:-1]) for p in list(traverse_util.flatten_dict(params))[:4]]}.")
  flat = traverse_util.flatten_dict(params)
  tree = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    *layers, fan_in, fan_out = flat[path + ("kernel",)].shape
    bound = 1.0 / jnp.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in))
    tree[path + ("a",)] = jax.random.uniform(key, (*layers, fan_in, config.rank), dtype, -bound,
                                             bound)
    tree[path + ("b",)] = jnp.zeros((*layers, config.rank, fan_out), dtype)
  return traverse_util.unflatten_dict(tree)


def scaled(lora: Any, scale: float) -> Any:
  """The tree the model applies: `b` multiplied by alpha/rank."""
  flat = traverse_util.flatten_dict(lora)
  return traverse_util.unflatten_dict(
      {path: leaf * scale if path[-1] == "b" else leaf for path, leaf in flat.items()})


def merge(params: Any, lora: Any, scale: float) -> Any:
  """Base-shaped params with `kernel + scale · a @ b` at every LoRA target (each merged kernel keeps
  its dtype and, for a jax.Array, its sharding); other leaves are the same objects."""
  flat = traverse_util.flatten_dict(params)
  flat_lora = traverse_util.flatten_dict(lora)
  merged = dict(flat)
  for path, a in flat_lora.items():
    if path[-1] != "a":
      continue
    module = path[:-1]
    kernel = flat[module + ("kernel",)]
    placed = None if isinstance(kernel, jax.core.Tracer) else getattr(kernel, "sharding", None)
    merge_one = jax.jit(_merged_kernel, static_argnames="scale", out_shardings=placed)
    merged[module + ("kernel",)] = merge_one(kernel, a, flat_lora[module + ("b",)], scale=scale)
  return traverse_util.unflatten_dict(merged)


def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  update = scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
