"""Stacked ↔ per-layer trees: scanned towers keep each layer kind as one [layers, ...] array, while
Hugging Face names (and the weight maps) count layers one by one; these functions convert between them.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The scanned module of each tower; unrolled, its layers are `<name>_<i>` (HF `encoder.layer.<i>`,
# `model.layers.<i>`).
ENCODER_LAYERS = "layer"
DECODER_LAYERS = "layers"
_STACKS = (ENCODER_LAYERS, DECODER_LAYERS)


def stack_name(tree: Any) -> str | None:
  """The name of the layer stack in a tower's tree (`ENCODER_LAYERS` or `DECODER_LAYERS`), or None
  where its layers are unrolled or it has none."""
  return next((name for name in _STACKS if name in tree), None)


def per_layer(tree: Any) -> Any:
  """`{name: {...[L, ...]}}` → `{name_0: {...}, ..., name_{L-1}: {...}}` (views, no copies); a tree
  already per layer (or with no layers, as a LoRA tree on the head alone) comes back as it is."""
  name = stack_name(tree)
  if name is None:
    return tree
  out = {key: value for key, value in tree.items() if key != name}
  num_layers = jax.tree.leaves(tree[name])[0].shape[0]
  for i in range(num_layers):
    out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
  return out


def stacked_slot(path: tuple[str, ...]) -> tuple[tuple[str, ...], int] | None:
  """Per-layer `("layers_3", "mlp", ...)` → (`("layers", "mlp", ...)`, 3); None off the layers."""
  name, _, index = path[0].rpartition("_")
  if name in _STACKS and index.isdigit():
    return (name,) + tuple(path[1:]), int(index)
  return None


def lookup(tree: Any, path: tuple[str, ...]) -> Any:
  """The leaf at per-layer `path` (`("layers_3", "mlp", ...)`) in a tree of either layout; from a
  stacked tree only that layer's slice is taken."""
  slot = stacked_slot(path)
  if path[0] not in tree and slot is not None and slot[0][0] in tree:
    return lookup(tree[slot[0][0]], path[1:])[slot[1]]
  node = tree
  for key in path:
    node = node[key]
  return node


def stacked(tree: Any, num_layers: int, consume: bool = False) -> Any:
  """The inverse of per_layer for a tower of `num_layers` layers, leaf kind by leaf kind. With
  `consume` the per-layer entries are taken out of `tree` as they are stacked, so numpy weights
  peak at one extra leaf kind rather than a second copy of the tower."""
  if not isinstance(tree, dict):
    return tree
  name = next((n for n in _STACKS if f"{n}_0" in tree), None)
  if name is None:
    return tree
  keys = [f"{name}_{i}" for i in range(num_layers)]
  out = {key: value for key, value in tree.items() if key not in keys}
  layers = [traverse_util.flatten_dict(tree.pop(key) if consume else tree[key]) for key in keys]
  stack = {}
  for path in list(layers[0]):
    parts = [layer.pop(path) for layer in layers]
    stack[path] = (np.stack(parts) if all(isinstance(p, np.ndarray) for p in parts)
                   else jnp.stack(parts))
  out[name] = traverse_util.unflatten_dict(stack)
  return out


def in_layout(tree: Any, cfg: Any, consume: bool = False) -> Any:
  """`tree` (either layout) in the layout `cfg.scan_layers` asks for."""
  return stacked(tree, cfg.num_layers, consume) if cfg.scan_layers else per_layer(tree)
