"""The device mesh and the logical-axis rules that place every parameter and batch on it.

Rules are `mesh.rules` of the config (logical axis, mesh axes); a dimension an axis does not divide stays whole.
"""

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh over all (or the given) devices; one entry of `shape` may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axes)} differ in length.")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)} has more than one -1.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide {len(devices)} devices.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices):
    raise ValueError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but "
                     f"{len(devices)} are available; set --config.mesh.shape to match (one entry "
                     f"may be -1).")
  if math.prod(shape) < len(devices):
    logging.warning("mesh.shape %s uses %d of %d devices.", tuple(shape), math.prod(shape),
                    len(devices))
    devices = devices[:math.prod(shape)]
  # Auto axes: XLA propagates shardings through gathers and reshapes inside the towers.
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes), axis_types=axis_types)


def normalize_rules(rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Config rules (lists from JSON, strings or None) as ((logical, (mesh axes...)), ...)."""
  out = []
  for logical, mesh_axes in rules:
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    out.append((logical, tuple(mesh_axes)))
  return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules) -> PartitionSpec:
  """PartitionSpec for one array: each logical axis takes the mesh axes its rule names, if they
  divide the dimension and are not used by an earlier dimension."""
  rule_map = dict(normalize_rules(rules))
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    chosen = []
    for axis in rule_map.get(name, ()) if name is not None else ():
      if axis in used or axis not in mesh.shape:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def kept_whole(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
               rules) -> list[str]:
  """Mesh axes (of size > 1) that a rule gives a dimension of this array but that do not divide it,
  as 'axis (size) on dim i (length)' strings; empty when every rule could be followed."""
  rule_map = dict(normalize_rules(rules))
  spec = logical_to_spec(logical_axes, shape, mesh, rules)
  used = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
  missed = []
  for dim, (name, size) in enumerate(zip(logical_axes, shape)):
    for axis in rule_map.get(name, ()) if name is not None else ():
      if axis in mesh.shape and mesh.shape[axis] > 1 and axis not in used:
        missed.append(f"{axis} ({mesh.shape[axis]}) on dim {dim} ({size})")
  return missed


def replication_warning(tree: Any, mesh: Mesh, rules, warn_share: float,
                        listed: int = 8) -> str | None:
  """A message naming the largest arrays of a boxed tree that stay whole on a mesh axis their rules
  name because it does not divide them, when they hold more than `warn_share` of the tree's bytes."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_boxed)[0]
  total, whole = 0, []
  for path, leaf in leaves:
    value = leaf.value if _is_boxed(leaf) else leaf
    size = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    total += size
    if _is_boxed(leaf):
      missed = kept_whole(leaf.names, value.shape, mesh, rules)
      if missed:
        whole.append((size, _path_name(path), tuple(value.shape), missed))
  share = sum(w[0] for w in whole) / max(total, 1)
  if share <= warn_share:
    return None
  whole.sort(key=lambda w: -w[0])
  names = "; ".join(f"{name} {shape}: {', '.join(missed)}" for _, name, shape, missed in
                    whole[:listed])
  more = f"; and {len(whole) - listed} more" if len(whole) > listed else ""
  return (f"{share:.0%} of parameter bytes ({sum(w[0] for w in whole) / 2**20:.1f} of "
          f"{total / 2**20:.1f} MiB) stay whole on a mesh axis that does not divide them, so every "
          f"device on that axis holds a full copy: {names}{more}. Choose mesh.shape so the axes "
          f"divide these dimensions, or change mesh.rules (threshold: mesh.replicated_warn_share).")


def _path_name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def warn_replicated(tree: Any, mesh: Mesh, rules, warn_share: float) -> None:
  message = replication_warning(tree, mesh, rules, warn_share)
  if message:
    logging.warning(message)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def shardings_for(tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (possibly abstract) tree whose leaves may be `nn.Partitioned` boxes.

  Unboxed leaves (LoRA factors, optimizer counters) are replicated.
  """
  def one(leaf):
    if _is_boxed(leaf):
      value = leaf.value
      return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=_is_boxed)


def shardings_following_params(tree: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (an optimizer state) whose leaves mirror params at some key-path suffix.

  A leaf whose path ends with a param's path takes that param's sharding; others are replicated.
  """
  by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  def one(path, _):
    for start in range(len(path)):
      if tuple(path[start:]) in by_path:
        return by_path[tuple(path[start:])]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of an input array whose leading axis is the global batch."""
  batch_axes = dict(normalize_rules(rules)).get("batch", ())
  batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
  lead = batch_axes if len(batch_axes) != 1 else batch_axes[0]
  return NamedSharding(mesh, PartitionSpec(lead or None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings (restore targets, jit signatures)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh the arrays of `tree` are sharded on, if they carry one."""
  for leaf in jax.tree.leaves(tree):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if isinstance(mesh, Mesh):
      return mesh
  return None
