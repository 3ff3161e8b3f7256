"""The dense attention kernel: whole [T,S] logits per head, for short sequences.

Its backward is written by hand and recomputes the probabilities, so no float [T,S] tensor outlives a layer.
"""

import math

import jax
import jax.numpy as jnp

# jax.nn.dot_product_attention's value for masked logits: a row with no visible key averages them.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.custom_vjp
def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Attention over whole [T,S] logits per head: the "xla" kernel, for short sequences.

  Heads are moved in front before the dots, the scale goes on q rather than on the logits, and
  the softmax is normalised after the value product ([T,H] divisions instead of [T,S]): on CPU
  this ran MiniLM's attention block 1.3x faster than jax.nn.dot_product_attention, with the same
  numbers (bench/RESULTS.md). Masked rows that see nothing average the values, as jax's does.
  The backward is written by hand (`_dense_backward`): it keeps q, k, v, the output and each
  row's peak and normaliser, and recomputes the probabilities, so of [T,S] only the boolean mask
  outlives the layer (jax's own autodiff kept every layer's float32 probabilities for the backward).
  """
  return _dense_forward(q, k, v, mask)[0]


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
  """(masked float32 logits [B,K,G·T,S], the mask broadcast to them) of grouped queries."""
  batch, length, heads, _ = q_shape
  kv_heads, keys = k_first.shape[1], k_first.shape[2]
  groups = heads // kv_heads
  logits = jnp.einsum("bkqh,bksh->bkqs", scaled_q, k_first, preferred_element_type=jnp.float32)
  per_head = mask.shape[1] != 1
  mask = mask.reshape(batch, kv_heads if per_head else 1, groups if per_head else 1,
                      *mask.shape[2:])
  mask = jnp.broadcast_to(mask, (batch, kv_heads, groups, length, keys)).reshape(logits.shape)
  return jnp.where(mask, logits, MASKED), mask


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
  return out, (q, k, v, mask, out, peak, 1.0 / denom)


def _dense_backward(residuals, d_out):
  """Softmax attention's gradients from the recomputed probabilities P = exp(logits − peak)/denom:
  dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) where a key is visible, dQ = dS K, dK = dSᵀ Q."""
  q, k, v, mask, out, peak, inverse_denom = residuals
  scaled_q, k_first, v_first = _scaled_grouped(q, k, v)
  logits, visible = _dense_logits(scaled_q, k_first, mask, q.shape)
  probs = jnp.exp(logits - peak) * inverse_denom
  kv_heads = k.shape[2]
  d_out = _grouped_queries(d_out, kv_heads)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * _grouped_queries(out, kv_heads).astype(jnp.float32),
                    axis=-1, keepdims=True)
  d_v = jnp.einsum("bkqs,bkqh->bksh", probs.astype(v.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bkqh,bksh->bkqs", d_out, v_first, preferred_element_type=jnp.float32)
  # A row that sees nothing averages the values without looking at its logits: no dS there.
  d_logits = jnp.where(visible, probs * (d_probs - row_dot), 0.0).astype(q.dtype)
  d_q = jnp.einsum("bkqs,bksh->bkqh", d_logits, k_first, preferred_element_type=jnp.float32)
  d_q = _ungrouped(d_q * (1.0 / math.sqrt(q.shape[-1])), q.shape)
  d_k = jnp.einsum("bkqs,bkqh->bksh", d_logits, scaled_q, preferred_element_type=jnp.float32)
  last = lambda x: x.transpose(0, 2, 1, 3)  # [B,K,S,H] → [B,S,K,H]
  return d_q.astype(q.dtype), last(d_k).astype(k.dtype), last(d_v).astype(v.dtype), None


dense_attention.defvjp(_dense_forward, _dense_backward)
