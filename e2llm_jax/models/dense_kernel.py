"""The dense attention kernel: whole [T,S] logits per head, for short sequences.

Its backward is written by hand and recomputes the probabilities, so no float [T,S] tensor outlives a layer.
"""

import functools
import math

import jax
import jax.numpy as jnp

from e2llm_jax.models import packing

# jax.nn.dot_product_attention's value for masked logits: a row with no visible key averages them.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# On a CPU a batch whose float32 logits pass SPLIT_ABOVE_BYTES goes through the kernel a group of
# sequences at a time, the most (a power of two) whose logits fit in CACHE_GROUP_BYTES, so that a
# group's [T,S] tensors stay in cache from one dot to the next. MiniLM's attention over 64 chunks
# of 128 tokens (50 MB of logits, 4 chunks a group) took 0.67-0.84x the time forward and backward
# and 0.37-0.63x forward alone (4 KB pages and huge pages), over 16 chunks (13 MB) 0.79x forward;
# SmolLM2's training batch (4.5 MB) gained nothing (bench/RESULTS.md, 2026-12-06).
SPLIT_ABOVE_BYTES = 8 * 2**20
CACHE_GROUP_BYTES = 4 * 2**20


def cache_group(q_shape: tuple[int, ...], keys: int) -> int:
  """Sequences per group for `dense_attention(group=...)` on a CPU; 0: the batch at once."""
  batch, length, heads, _ = q_shape
  per_sequence = heads * length * keys * 4
  if batch * per_sequence <= SPLIT_ABOVE_BYTES:
    return 0
  group = 1  # below the whole batch: its logits pass SPLIT_ABOVE_BYTES > CACHE_GROUP_BYTES
  while group * 2 * per_sequence <= CACHE_GROUP_BYTES:
    group *= 2
  return group


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    group: int = 0) -> jax.Array:
  """Attention over whole [T,S] logits per head: the "xla" kernel, for short sequences.

  Heads are moved in front before the dots, the scale goes on q rather than on the logits, and
  the softmax is normalised after the value product ([T,H] divisions instead of [T,S]): on CPU
  this ran MiniLM's attention block 1.3x faster than jax.nn.dot_product_attention, with the same
  numbers (bench/RESULTS.md). Masked rows that see nothing average the values, as jax's does.
  The backward is written by hand (`_dense_backward`): it keeps q, k, v, the output and each
  row's peak and normaliser, and recomputes the probabilities, so of [T,S] only the boolean mask
  outlives the layer (jax's own autodiff kept every layer's float32 probabilities for the backward).
  `group` > 0 runs forward and backward over the batch that many sequences at a time
  (`cache_group`); the numbers are the same.
  """
  return _grouped_forward(q, k, v, mask, group)[0]


def _grouped_queries(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B,T,N,H] → [B,K,G·T,H]: the queries of one KV head are one matmul operand."""
  batch, length, heads, head_dim = q.shape
  groups = heads // kv_heads
  return q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4).reshape(
      batch, kv_heads, groups * length, head_dim)


def _ungrouped(x: jax.Array, q_shape: tuple[int, ...]) -> jax.Array:
  """[B,K,G·T,H] → [B,T,N,H], the inverse of `_grouped_queries`."""
  batch, length, heads, head_dim = q_shape
  kv_heads = x.shape[1]
  return x.reshape(batch, kv_heads, heads // kv_heads, length, head_dim).transpose(
      0, 3, 1, 2, 4).reshape(q_shape)


def _dense_logits(scaled_q: jax.Array, k_first: jax.Array, mask: jax.Array,
                  q_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(masked float32 logits [B,K,G·T,S] of grouped queries, where dS may be non-zero: the mask
  broadcast to them, or [B,K,G·T,1] for a mask of keys only).

  A mask of keys only ([B,·,1,S], padding) goes on as an added bias of 0 or MASKED rather than a
  select: XLA:CPU fuses the add into the softmax's pass over the logits, where the select took a
  pass of its own (MiniLM's attention at 32k, forward 0.68x the time, bench/RESULTS.md). MASKED's
  unit in the last place is 2^104, so MASKED + l rounds to MASKED for every |l| < 2^103: both
  give the same logits. A mask per query (causal) stays a select: as a bias of [T,S] floats it
  made the train step no faster (1.03x the time).
  """
  batch, length, heads, _ = q_shape
  kv_heads, keys = k_first.shape[1], k_first.shape[2]
  groups = heads // kv_heads
  logits = jnp.einsum("bkqh,bksh->bkqs", scaled_q, k_first, preferred_element_type=jnp.float32)
  per_head = mask.shape[1] != 1
  mask = mask.reshape(batch, kv_heads if per_head else 1, groups if per_head else 1,
                      *mask.shape[2:])
  grouped, rows = (batch, kv_heads, groups, length), logits.shape[:3]
  logits = logits.reshape(*grouped, keys)
  if mask.shape[3] == 1:
    logits = logits + jnp.where(mask, 0.0, MASKED)
    # A key a row does not see has P = 0 exactly, so only a row that sees nothing needs dS zeroed.
    ds_nonzero = jnp.any(mask, axis=-1, keepdims=True)
  else:
    logits, ds_nonzero = jnp.where(mask, logits, MASKED), mask
  flat = lambda x: jnp.broadcast_to(x, (*grouped, x.shape[-1])).reshape(*rows, x.shape[-1])
  return flat(logits), flat(ds_nonzero)


def _scaled_grouped(q, k, v):
  """q scaled and grouped as `_grouped_queries`, and k, v with their heads in front: [B,K,S,H]."""
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  first = lambda x: x.transpose(0, 2, 1, 3)  # [B,S,K,H] → [B,K,S,H]
  return _grouped_queries(q * scale, k.shape[2]), first(k), first(v)


def _dense_forward(q, k, v, mask):
  scaled_q, k_first, v_first = _scaled_grouped(q, k, v)
  logits, _ = _dense_logits(scaled_q, k_first, mask, q.shape)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  probs = jnp.exp(logits - peak)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v_first,
                   preferred_element_type=jnp.float32) / denom
  out = _ungrouped(out, q.shape).astype(q.dtype)
  # peak and 1/denom rather than their log-sum-exp: a row that sees nothing has peak = MASKED,
  # and MASKED + log(S) rounds back to MASKED, which would make every probability 1.
  return out, (peak, 1.0 / denom)


def _grouped_forward(q, k, v, mask, group):
  out, (peak, inverse_denom) = packing.over_groups(_dense_forward, group, q, k, v, mask)
  return out, packing.pack((q, k, v, mask, out, peak, inverse_denom))


def _grouped_backward(group, residuals, d_out):
  return (*packing.over_groups(_dense_backward, group, *packing.unpack(residuals), d_out), None)


def _dense_backward(q, k, v, mask, out, peak, inverse_denom, d_out):
  """Softmax attention's gradients from the recomputed probabilities P = exp(logits − peak)/denom:
  dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) where a key is visible, dQ = dS K, dK = dSᵀ Q.
  dV and dK are computed transposed ([H,S] per head, contracting the queries of both operands'
  leading axis), which XLA:CPU ran 1.5x faster than Pᵀ dO itself."""
  scaled_q, k_first, v_first = _scaled_grouped(q, k, v)
  logits, ds_nonzero = _dense_logits(scaled_q, k_first, mask, q.shape)
  probs = jnp.exp(logits - peak) * inverse_denom
  kv_heads = k.shape[2]
  d_out = _grouped_queries(d_out, kv_heads)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * _grouped_queries(out, kv_heads).astype(jnp.float32),
                    axis=-1, keepdims=True)
  d_v = jnp.einsum("bkqh,bkqs->bkhs", d_out, probs.astype(v.dtype),
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bkqh,bksh->bkqs", d_out, v_first, preferred_element_type=jnp.float32)
  # A row that sees nothing averages the values without looking at its logits: no dS there.
  d_logits = jnp.where(ds_nonzero, probs * (d_probs - row_dot), 0.0).astype(q.dtype)
  d_q = jnp.einsum("bkqs,bksh->bkqh", d_logits, k_first, preferred_element_type=jnp.float32)
  d_q = _ungrouped(d_q * (1.0 / math.sqrt(q.shape[-1])), q.shape)
  d_k = jnp.einsum("bkqh,bkqs->bkhs", scaled_q, d_logits, preferred_element_type=jnp.float32)
  last = lambda x: x.transpose(0, 3, 1, 2)  # [B,K,H,S] → [B,S,K,H]
  return d_q.astype(q.dtype), last(d_k).astype(k.dtype), last(d_v).astype(v.dtype)


dense_attention.defvjp(_grouped_forward, _grouped_backward)
