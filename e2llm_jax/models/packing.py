"""16-bit floats carried as uint16 through the places where XLA:CPU would widen them to float32:
values saved for a backward pass, the per-iteration outputs a scan or map stacks, and the frozen
kernels a layer scan slices (`over_groups`, the group loop, and `one_cpu_device`, where a group loop
under a gradient pays).

XLA:CPU has no bfloat16 dynamic-update-slice: a scan that writes one layer's bf16 slice into its
stack converts the whole stack to float32 and back, every iteration (the train step's residual
stacks: 20% of its op time in bfloat16, bench/RESULTS.md). The same bits as uint16 are written in
place. Other backends keep their arrays as they are.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Packed:
  """A 16-bit float array's bits, and the dtype they come back as."""
  bits: jax.Array
  dtype: Any = flax.struct.field(pytree_node=False)


def _is_16_bit_float(x) -> bool:
  return (isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
          and jnp.dtype(x.dtype).itemsize == 2)


def pack(tree: Any) -> Any:
  """`tree` with every 16-bit float array (on a CPU) replaced by its `Packed` bits."""
  if jax.default_backend() != "cpu":
    return tree
  return jax.tree.map(
      lambda x: Packed(jax.lax.bitcast_convert_type(x, jnp.uint16), x.dtype)
      if _is_16_bit_float(x) else x, tree)


def unpack(tree: Any) -> Any:
  """The inverse of `pack`."""
  return jax.tree.map(
      lambda x: jax.lax.bitcast_convert_type(x.bits, x.dtype) if isinstance(x, Packed) else x,
      tree, is_leaf=lambda x: isinstance(x, Packed))


def one_cpu_device() -> bool:
  """Whether loops over cache-sized groups run here even under a gradient: on one CPU device. Off
  the CPU groups only bound memory, and over a batch sharded across devices a loop over groups
  would gather it."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def over_groups(fn, group: int, *arrays, rows_used=None):
  """`fn` over the arrays' batch, `group` rows at a time under `lax.map` (0: all at once), its
  outputs stacked packed and rejoined; the rows past the last whole group go through as one
  smaller call rather than padded to a group (no work on padding, nothing to slice off after).
  Given `rows_used` (a traced int), whole groups past that many rows are not run (a loop with
  that many turns, not differentiable in reverse) and their outputs are zeros."""
  batch = arrays[0].shape[0]
  if not group or group >= batch:
    return fn(*arrays)
  count = batch // group
  whole = count * group
  groups = tuple(x[:whole].reshape(count, group, *x.shape[1:]) for x in arrays)
  run = lambda xs: pack(fn(*xs))
  if rows_used is None:
    outs = jax.lax.map(run, groups)
  else:
    shapes = jax.eval_shape(run, tuple(x[0] for x in groups))
    stacks = jax.tree.map(lambda y: jnp.zeros((count, *y.shape), y.dtype), shapes)
    write = lambda i, stacks: jax.tree.map(
        lambda stack, y: jax.lax.dynamic_update_index_in_dim(stack, y, i, 0), stacks,
        run(tuple(x[i] for x in groups)))
    turns = jnp.minimum(-(-rows_used // group), count)
    outs = jax.lax.fori_loop(0, turns, write, stacks)
  outs = jax.tree.map(lambda y: y.reshape(whole, *y.shape[2:]), unpack(outs))
  if whole < batch:
    rest = fn(*(x[whole:] for x in arrays))
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, rest)
  return outs
