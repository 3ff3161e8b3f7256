"""Softmax attention for both towers: masks kept as per-row vectors, and the kernel chosen per backend.

Dense (XLA) for short sequences; blockwise online softmax that never builds [T,S]; cuDNN on GPU; Pallas on TPU.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from e2llm_jax.models import packing
from e2llm_jax.models.dense_kernel import MASKED, cache_group, dense_attention

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "pallas")
# "auto" stays dense while one head's logits hold at most this many entries (1024², 4 MB in
# float32): below it the dense kernel is as fast and compiles to less; above it the blockwise one
# keeps memory at O(block·S) and skips blocks no query may see.
DENSE_MAX_LOGITS = 1024 * 1024


@flax.struct.dataclass
class AttentionMask:
  """What each query may see, as vectors per row, so no [T,S] tensor exists before a kernel needs one.

  key_valid [B,S]: real keys. With query_slots [B,T] the mask is causal over slots (a query sees
  keys at slots <= its own); with sliding_window also `query_position - key_position < window`.
  A query always sees its own slot, so rows of padding never hold an empty softmax.
  `aligned`: the queries are the keys in slot order (a full-sequence forward, T == S).
  """
  key_valid: jax.Array
  query_slots: jax.Array | None = None
  query_positions: jax.Array | None = None
  key_positions: jax.Array | None = None
  sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)
  aligned: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def causal(self) -> bool:
    return self.query_slots is not None

  def dense(self) -> jax.Array:
    """Bool [B,1,T,S] ([B,1,1,S] without queries), as the dense kernels take it."""
    key_slots = jnp.arange(self.key_valid.shape[-1])
    return allowed(self, key_slots, self.key_valid, self.key_positions, self.query_slots,
                   self.query_positions)[:, None]


def allowed(mask: AttentionMask, key_slots, key_valid, key_positions, query_slots,
            query_positions) -> jax.Array:
  """Bool [B,T,S] ([B,1,S] when not causal) for the given slices of keys and queries."""
  visible = key_valid.astype(bool)[:, None, :]
  if not mask.causal:
    return visible
  own = key_slots[None, None, :] == query_slots[:, :, None]
  visible = visible & (key_slots[None, None, :] <= query_slots[:, :, None])
  if mask.sliding_window is not None:
    visible &= (query_positions[:, :, None] - key_positions[:, None, :]) < mask.sliding_window
  return visible | own


def key_padding_mask(key_valid: jax.Array) -> AttentionMask:
  """Bidirectional attention over the real keys (BERT, pooling)."""
  return AttentionMask(key_valid=key_valid.astype(bool))


def resolve(implementation: str, length: int, keys: int, dtype, mask: AttentionMask | None,
            backend: str | None = None) -> str:
  """The kernel `implementation` means for these shapes on this backend ("auto" picks one)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {implementation!r}; choose one of "
                     f"{IMPLEMENTATIONS} (config key model.attention).")
  backend = backend or jax.default_backend()
  if implementation == "auto":
    if backend == "gpu" and _cudnn_fits(dtype, mask):
      return "cudnn"
    if backend == "tpu" and _pallas_fits(mask):
      return "pallas"
    return "xla" if length * keys <= DENSE_MAX_LOGITS or mask is None else "blockwise"
  if implementation in ("blockwise", "pallas") and mask is None:
    return "xla"  # a caller-built dense mask: only the dense kernel reads it
  return implementation


def _cudnn_fits(dtype, mask: AttentionMask | None) -> bool:
  # cuDNN's fused kernel takes half-precision inputs, and masks it can take as sequence lengths
  # (`_by_lengths`), which cost nothing at any length. Others it would read as a dense [T,S] bias
  # (with constraints of its own, e.g. even lengths under a gradient): those stay with our kernels.
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return half and _by_lengths(mask)


def _by_lengths(mask: AttentionMask | None) -> bool:
  """The mask is "padding only" (bidirectional) or "causal over the sequence itself" (a full
  forward without a window): cuDNN then takes it as key lengths, the real keys moved to the front
  first where the padding is not on the right."""
  return mask is not None and mask.sliding_window is None and (not mask.causal or mask.aligned)


def _pallas_fits(mask: AttentionMask | None) -> bool:
  # The Pallas kernel's masks are static and slot-based: a full forward without a window.
  return mask is not None and mask.aligned and mask.sliding_window is None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, implementation: str = "auto",
              block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Softmax attention. q [B,T,N,H], k/v [B,S,K,H] (K divides N) → [B,T,N,H] in q's dtype.

  `mask` is an `AttentionMask` or a dense bool array [B,1|N,T|1,S]. Logits and softmax are
  float32 whatever the kernel.
  """
  dense_given = not isinstance(mask, AttentionMask)
  kind = resolve(implementation, q.shape[1], k.shape[1], q.dtype, None if dense_given else mask)
  if kind == "blockwise":
    return blockwise_attention(q, k, v, mask, block_q, block_k)
  if kind == "pallas":
    return _pallas_attention(q, k, v, mask)
  if kind == "cudnn" and not dense_given and _by_lengths(mask):
    return _cudnn_by_lengths(q, k, v, mask)
  dense = mask if dense_given else mask.dense()
  if kind == "cudnn":  # asked for by name with another mask: cuDNN takes it as a full-size bias
    return _cudnn(q, k, v, mask=jnp.broadcast_to(dense, (*dense.shape[:2], q.shape[1], k.shape[1])))
  return dense_attention(q, k, v, dense, _cpu_cache_group(q.shape, k.shape[1]))


def _cpu_cache_group(q_shape, keys: int) -> int:
  return cache_group(q_shape, keys) if packing.one_cpu_device() else 0


# The fused GPU kernel; a test stands jax's reference implementation in for it on the CPU.
_cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")


def _cudnn_by_lengths(q, k, v, mask: AttentionMask) -> jax.Array:
  """cuDNN with the mask given as key lengths (and the causal flag): no [T,S] tensor at any length.

  Exact as it stands when each row's real keys are a prefix (right padding), which is checked on
  the device; otherwise the real keys (and, causal, the queries with them) are first moved to the
  front in order and the output moved back. Rows of padding only (padded chunks) differ from the
  other kernels, as do padded query rows under causal masking: nothing reads them.
  """
  destination, lengths = _real_keys_first(mask.key_valid)
  # A row of length 0 is given one key: fused kernels are known to return NaN for empty rows,
  # and NaN · 0 in pooling or in the value product would reach the loss.
  by_lengths = lambda q, k, v: _cudnn(q, k, v, is_causal=mask.causal,
                                      key_value_seq_lengths=jnp.maximum(lengths, 1))

  def compacted(q, k, v):
    # Moving real keys to the front keeps their order, so a causal query (moved with its key)
    # still sees exactly the real keys at or before it.
    gather = lambda x, index: jnp.take_along_axis(x, index[:, :, None, None], axis=1)
    source = jnp.argsort(destination, axis=-1)
    k, v = gather(k, source), gather(v, source)
    if not mask.causal:
      return by_lengths(q, k, v)
    return gather(by_lengths(gather(q, source), k, v), destination)

  # Under a gradient a cond keeps both branches' residuals; rematerialising the rarer branch keeps
  # its moved copies of q, k, v out of the residuals when the padding was already on the right.
  return jax.lax.cond(_unmoved(destination), by_lengths, jax.checkpoint(compacted), q, k, v)


def _real_keys_first(key_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(destination [B,S] of each slot when a row's real keys move to its front in order and its
  padding after them, real keys per row [B])."""
  valid = key_valid.astype(bool)
  lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  destination = jnp.where(valid, jnp.cumsum(valid, -1) - 1,
                          lengths[:, None] + jnp.cumsum(~valid, -1) - 1)
  return destination, lengths


def _unmoved(destination: jax.Array) -> jax.Array:
  return jnp.all(destination == jnp.arange(destination.shape[-1]))


def right_padded(key_valid: jax.Array) -> jax.Array:
  """Bool scalar: every row's real keys [B,S] are a prefix of it (padding only on the right)."""
  return _unmoved(_real_keys_first(key_valid)[0])


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Split `axis` into blocks of `size` and move the block index to the front."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


_FAR = 1 << 30  # beyond any slot or position: the bound of an empty set


def _block_kinds(mask: AttentionMask, key_valid, key_slots, key_positions, query_slots,
                 query_positions) -> jax.Array:
  """[nq,nk] int32 per (query block, key block): 0 no query sees it (skipped); 1 every real query
  sees all of it (no mask is made: the selects were 7% of an 8k prefill); 2 partly seen (masked).

  Decided once for all pairs from the blocks' slot and position bounds, so the loop builds no
  [bq,bk] mask and runs no per-pair bookkeeping to decide; 2 may stand where 0 is true, never 1.
  Inputs are blocked: key_valid [nk,B,bk], key_slots [nk,bk], query_slots [nq,B,bq].
  """
  all_real = jnp.all(key_valid, -1)[None]  # [1,nk,B]
  any_real = jnp.any(key_valid, -1)[None]
  if not mask.causal:
    every, some = jnp.all(all_real, -1), jnp.any(any_real, -1)
    return jnp.where(every, 1, jnp.where(some, 2, 0)).astype(jnp.int32)
  bounds = lambda x, real: (jnp.min(jnp.where(real, x, _FAR), -1)[:, None],
                            jnp.max(jnp.where(real, x, -_FAR), -1)[:, None])  # [n,1,B]
  query_lo, query_hi = bounds(query_slots, query_slots >= 0)
  key_lo, key_hi = key_slots[None, :, 0, None], key_slots[None, :, -1, None]  # [1,nk,1]
  every = all_real & (key_hi <= query_lo)  # all keys real and at or before every query
  some = any_real & (key_lo <= query_hi)
  if mask.sliding_window is not None:
    key_pos_lo, key_pos_hi = (b.transpose(1, 0, 2) for b in bounds(key_positions, key_valid))
    query_pos_lo, query_pos_hi = bounds(query_positions, query_slots >= 0)
    every &= query_pos_hi - key_pos_lo < mask.sliding_window
    some &= query_pos_lo - key_pos_hi < mask.sliding_window
  some |= (key_lo <= query_hi) & (key_hi >= query_lo)  # a query's own slot is in the block
  return jnp.where(jnp.all(every, -1), 1, jnp.where(jnp.any(some, -1), 2, 0)).astype(jnp.int32)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                        block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Flash-style attention in plain JAX: queries in blocks, an online softmax over key blocks.

  The mask of each (query block, key block) pair is made from the row vectors when it is needed;
  a pair no query may see (above the causal diagonal, outside the window, all padding) is skipped.
  Each query block is rematerialised in the backward pass, so training holds O(block_q·S) logits.
  Lengths that blocks do not divide are padded, and the padding is masked out.
  Rows with no visible key at all return the mean of the values in the blocks they reach.
  """
  batch, length, heads, head_dim = q.shape
  keys, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  block_q, block_k = min(block_q, length), min(block_k, keys)
  scale = 1.0 / math.sqrt(head_dim)
  out_dtype = q.dtype

  # [B,T,N,H] → [nq, B, K, G·bq, H]: a query block of one KV head is one matmul operand.
  qs = (q * jnp.asarray(scale, q.dtype)).reshape(batch, length, kv_heads, groups, head_dim)
  qs = _blocks(_pad_to(qs.transpose(0, 2, 3, 1, 4), 3, block_q), 3, block_q)
  num_q = qs.shape[0]
  qs = qs.reshape(num_q, batch, kv_heads, groups * block_q, head_dim)
  ks = _blocks(_pad_to(k.transpose(0, 2, 1, 3), 2, block_k), 2, block_k)  # [nk,B,K,bk,H]
  vs = _blocks(_pad_to(v.transpose(0, 2, 1, 3), 2, block_k), 2, block_k)
  padded_keys = keys % block_k != 0
  key_valid = _blocks(_pad_to(mask.key_valid.astype(bool), 1, block_k, False), 1, block_k)
  key_slots = _blocks(jnp.arange(key_valid.shape[0] * block_k), 0, block_k)  # [nk,bk]
  key_positions = (None if mask.key_positions is None else
                   _blocks(_pad_to(mask.key_positions, 1, block_k), 1, block_k))
  query_slots = query_positions = None
  if mask.causal:
    query_slots = _blocks(_pad_to(mask.query_slots, 1, block_q, -1), 1, block_q)
    if mask.query_positions is not None:
      query_positions = _blocks(_pad_to(mask.query_positions, 1, block_q), 1, block_q)
  kinds = jnp.broadcast_to(_block_kinds(mask, key_valid, key_slots, key_positions, query_slots,
                                        query_positions), (num_q, key_valid.shape[0]))

  def one_query_block(q_block, q_slots, q_positions, kinds_row):
    def step(carry, key_block):
      kb, vb, valid, slots, positions, kind = key_block

      def update(carry, masked):
        row_max, denom, acc = carry
        logits = jnp.einsum("bkqh,bksh->bkqs", q_block, kb, preferred_element_type=jnp.float32)
        logits = logits.reshape(batch, kv_heads, groups, -1, block_k)
        if masked:
          visible = allowed(mask, slots, valid, positions, q_slots, q_positions)  # [B,bq|1,bk]
          logits = jnp.where(visible[:, None, None], logits, MASKED)
          if padded_keys:
            logits = jnp.where((slots < keys)[None, None, None, None], logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        probs = jnp.exp(logits - new_max[..., None])
        correction = jnp.exp(row_max - new_max)
        denom = denom * correction + jnp.sum(probs, axis=-1)
        probs = probs.reshape(batch, kv_heads, -1, block_k).astype(vb.dtype)
        pv = jnp.einsum("bkqs,bksh->bkqh", probs, vb, preferred_element_type=jnp.float32)
        acc = acc * correction.reshape(batch, kv_heads, -1)[..., None] + pv
        return new_max, denom, acc

      return jax.lax.switch(kind, (lambda c: c, lambda c: update(c, False),
                                   lambda c: update(c, True)), carry), None

    rows = q_block.shape[2]
    init = (jnp.full((batch, kv_heads, groups, rows // groups), jnp.finfo(jnp.float32).min),
            jnp.zeros((batch, kv_heads, groups, rows // groups), jnp.float32),
            jnp.zeros((batch, kv_heads, rows, head_dim), jnp.float32))
    (_, denom, acc), _ = jax.lax.scan(step, init, (ks, vs, key_valid, key_slots, key_positions, kinds_row))
    return acc / jnp.maximum(denom, jnp.finfo(jnp.float32).tiny).reshape(batch, kv_heads, rows, 1)

  one_query_block = jax.checkpoint(one_query_block, prevent_cse=False)
  empty = jnp.zeros((num_q, 1, 1), jnp.int32)  # stands in for absent slot/position vectors
  out = jax.lax.map(lambda xs: one_query_block(*xs),
                    (qs, empty if query_slots is None else query_slots,
                     empty if query_positions is None else query_positions, kinds))
  # [nq,B,K,G·bq,H] → [B,T,N,H]
  out = out.reshape(num_q, batch, kv_heads, groups, block_q, head_dim)
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_q * block_q, heads, head_dim)
  return out[:, :length].astype(out_dtype)


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
  """TPU Pallas splash attention for a full causal forward; padded keys are their own segment."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # TPU-only kernels
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  batch, length, heads, head_dim = q.shape
  groups = heads // k.shape[2]
  kernel = splash.make_splash_mha_single_device(
      splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads))
  to_heads_first = lambda x: jnp.repeat(x, groups, axis=2).transpose(0, 2, 1, 3)
  segments = mask.key_valid.astype(jnp.int32)
  qs = (q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)).transpose(0, 2, 1, 3)
  out = jax.vmap(lambda qb, kb, vb, seg: kernel(qb, kb, vb, splash.SegmentIds(q=seg, kv=seg)))(
      qs, to_heads_first(k), to_heads_first(v), segments)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
