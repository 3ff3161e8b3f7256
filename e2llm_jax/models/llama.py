"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as Hugging Face computes it.

RMSNorm, HF rotate-half RoPE (default / linear / llama3), GQA, SwiGLU, optional biases, KV cache.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2llm_jax.models import attention, layers, stacking

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a Llama-family decoder plus run-time numerics (dtype, remat, LoRA dropout)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  # Extra rope parameters as sorted (name, value) pairs so the config stays hashable.
  rope_params: tuple[tuple[str, float], ...] = ()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  hidden_act: str = "silu"
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  model_type: str = "llama"
  initializer_range: float = 0.02
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name, used when remat
  scan_layers: bool = True  # params stacked as `layers` [num_layers, ...], else `layers_<i>`
  lora_dropout: float = 0.0
  attention: str = "auto"  # attention.IMPLEMENTATIONS
  attention_block_q: int = 512  # blockwise kernel: queries and keys per block
  attention_block_k: int = 512

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"Unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def rope_inverse_frequencies(cfg: DecoderConfig) -> np.ndarray:
  """Inverse RoPE frequencies [head_dim/2] in float32, following transformers' rope init functions."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
  params = dict(cfg.rope_params)
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / np.float32(params["factor"])
  elif cfg.rope_type == "llama3":
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_cos_sin(cfg: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B,T,head_dim] for integer positions [B,T], float32 as HF computes them."""
  inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF rotate-half RoPE on x [B,T,N,H].

  Its backward is the rotation by −θ (cos and sin repeat over the two halves, as `rope_cos_sin`
  builds them), one pass like the forward: autodiff's transpose of the half swap went through
  slices and pads, 3% of a bf16 train step on a CPU (bench/RESULTS.md).
  """
  return _rotate_half_rope(x, cos, sin)


def _rotate_half_rope(x, cos, sin):
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _rope_backward(cos_sin, d_out):
  cos, sin = cos_sin
  return _rotate_half_rope(d_out, cos, -sin), None, None


apply_rope.defvjp(lambda x, cos, sin: (_rotate_half_rope(x, cos, sin), (cos, sin)), _rope_backward)


class Attention(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache, cache_index, deterministic):
    cfg = self.cfg
    dense = lambda n, axes, bias, name: layers.Dense(
        n, axes, use_bias=bias, dtype=cfg.compute_dtype, lora_dropout=cfg.lora_dropout,
        init_std=cfg.initializer_range, name=name)
    batch, length, _ = x.shape
    q = dense(cfg.num_heads * cfg.head_dim, ("embed", "heads"), cfg.qkv_bias, "q_proj")(
        x, deterministic)
    k = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, "k_proj")(
        x, deterministic)
    v = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, "v_proj")(
        x, deterministic)
    q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache = None
    if kv_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k.astype(kv_cache["k"].dtype),
                                              cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v.astype(kv_cache["v"].dtype),
                                              cache_index, axis=1)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = layers.attention(q, k, v, mask, cfg.attention, cfg.attention_block_q,
                           cfg.attention_block_k).reshape(batch, length, cfg.num_heads * cfg.head_dim)
    return dense(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, "o_proj")(out, deterministic), \
        new_cache


class MLP(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.cfg
    dense = lambda n, axes, name: layers.Dense(
        n, axes, use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype, lora_dropout=cfg.lora_dropout,
        init_std=cfg.initializer_range, name=name)
    gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x, deterministic)
    up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x, deterministic)
    return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
        layers.gated_activation(cfg.hidden_act)(gate, up), deterministic)


class DecoderLayer(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache, cache_index, deterministic):
    cfg = self.cfg
    h, new_cache = Attention(cfg, name="self_attn")(
        layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), cos, sin, mask, kv_cache,
        cache_index, deterministic)
    x = x + h
    x = x + MLP(cfg, name="mlp")(
        layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x), deterministic)
    return x, new_cache


class Decoder(nn.Module):
  """Causal LM over token ids or input embeddings. Returns (logits or hidden, updated cache)."""
  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range)
    layer_cls = layers.layer_class(DecoderLayer, cfg.remat_policy if cfg.remat else None,
                                   static_argnums=(7,),  # `deterministic`; self is 0
                                   scanned=cfg.scan_layers)
    if cfg.scan_layers:
      # (x | cos, sin, mask, this layer's kv cache, cache_index, deterministic)
      shared = nn.broadcast
      self.layers = layers.scanned(layer_cls, cfg.num_layers,
                                   (shared, shared, shared, 0, shared, shared),
                                   self.is_initializing())(cfg)
    else:
      self.layers = [layer_cls(cfg, name=f"{stacking.DECODER_LAYERS}_{i}")
                     for i in range(cfg.num_layers)]
    self.norm = layers.RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                                  lora_dropout=cfg.lora_dropout, init_std=cfg.initializer_range)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids).astype(self.cfg.compute_dtype)

  def __call__(self, inputs_embeds, positions, mask, cache=None, cache_index=0,
               deterministic=True, return_hidden=False):
    cfg = self.cfg
    if self.is_initializing():
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))  # the table exists even when it is untied
    x = inputs_embeds.astype(cfg.compute_dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}  # [layers, ...] each
    if cfg.scan_layers:
      x, new_cache = self.layers(x, cos, sin, mask, kv, cache_index, deterministic)
    else:
      updates = []
      for i, layer in enumerate(self.layers):
        x, updated = layer(x, cos, sin, mask, jax.tree.map(lambda c, i=i: c[i], kv), cache_index,
                           deterministic)
        updates.append(updated)
      new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *updates)
    x = self.norm(x)
    if return_hidden:
      return x, new_cache
    return self.head(x, deterministic), new_cache

  def head(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
    """Float32 logits from final (normed) hidden states."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden, deterministic).astype(jnp.float32)


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """Positions that count only real tokens (so left padding never shifts RoPE)."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) + jnp.asarray(offset, jnp.int32)[..., None]


def visibility(cfg: DecoderConfig, key_mask: jax.Array, query_slots: jax.Array,
               key_positions: jax.Array, query_positions: jax.Array,
               aligned: bool = False) -> attention.AttentionMask:
  """What each query sees, as row vectors: causal over slots, no padded keys, optional sliding
  window over positions; every query sees its own slot. The kernels build blocks of it as needed."""
  return attention.AttentionMask(
      key_valid=key_mask.astype(bool), query_slots=query_slots, query_positions=query_positions,
      key_positions=key_positions, sliding_window=cfg.sliding_window, aligned=aligned)


def attention_mask_matrix(cfg: DecoderConfig, key_mask: jax.Array, query_slots: jax.Array,
                          key_positions: jax.Array, query_positions: jax.Array) -> jax.Array:
  """Bool [B,1,T,S] of `visibility` (the dense form; memory grows with T·S)."""
  return visibility(cfg, key_mask, query_slots, key_positions, query_positions).dense()


def embed(cfg: DecoderConfig, params: Any, input_ids: jax.Array) -> jax.Array:
  """Token embeddings [B,T,D] in the compute dtype (what the decoder reads for text)."""
  return Decoder(cfg).apply({"params": params}, input_ids, method=Decoder.embed)


def _embeds(cfg, params, input_ids, inputs_embeds):
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
  return embed(cfg, params, input_ids) if inputs_embeds is None else inputs_embeds


def decoder_forward(cfg: DecoderConfig, params: Any, *, input_ids=None, inputs_embeds=None,
                    attention_mask=None, positions=None, lora=None, deterministic=True,
                    rngs=None, return_hidden=False) -> jax.Array:
  """Full-sequence forward: logits [B,T,V] float32 (or final hidden states with return_hidden)."""
  inputs_embeds = _embeds(cfg, params, input_ids, inputs_embeds)
  batch, length = inputs_embeds.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
  mask = visibility(cfg, attention_mask, slots, positions, positions, aligned=True)
  variables = {"params": params} if lora is None else {"params": params, "lora": lora}
  out, _ = Decoder(cfg).apply(variables, inputs_embeds, positions, mask,
                              deterministic=deterministic, return_hidden=return_hidden, rngs=rngs)
  return out


def logits_from_hidden(cfg: DecoderConfig, params: Any, hidden: jax.Array, lora=None,
                       deterministic=True, rngs=None) -> jax.Array:
  """Output head on selected hidden states (so a loss needs logits only where targets are)."""
  variables = {"params": params} if lora is None else {"params": params, "lora": lora}
  return Decoder(cfg).apply(variables, hidden, deterministic, method=Decoder.head, rngs=rngs)


def decoder_logits(cfg: DecoderConfig, params: Any, input_ids=None, inputs_embeds=None,
                   attention_mask=None, positions=None, lora=None) -> jax.Array:
  """Logits [B,T,V] (float32). Padding may sit left or right; positions count real tokens only."""
  return decoder_forward(cfg, params, input_ids=input_ids, inputs_embeds=inputs_embeds,
                         attention_mask=attention_mask, positions=positions, lora=lora)


def init_cache(cfg: DecoderConfig, batch: int, max_length: int, dtype=None) -> dict:
  """Empty KV cache: k/v [layers,B,S,kv_heads,head_dim], key mask [B,S], next slot, next position."""
  dtype = dtype or cfg.compute_dtype
  shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "key_mask": jnp.zeros((batch, max_length), jnp.int32),
          "key_positions": jnp.zeros((batch, max_length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def decoder_step(cfg: DecoderConfig, params: Any, cache: dict, *, input_ids=None,
                 inputs_embeds=None, attention_mask=None, lora=None) -> tuple[jax.Array, dict]:
  """Append T tokens to the cache and return their logits [B,T,V] and the new cache.

  Positions continue from the real tokens already cached, so prefill and token-by-token decoding
  give the same answer as one full forward.
  """
  inputs_embeds = _embeds(cfg, params, input_ids, inputs_embeds)
  batch, length = inputs_embeds.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  index = cache["index"]
  seen = jnp.sum(cache["key_mask"], axis=-1)
  positions = positions_from_mask(attention_mask, seen)
  key_mask = jax.lax.dynamic_update_slice_in_dim(
      cache["key_mask"], attention_mask.astype(jnp.int32), index, axis=1)
  key_positions = jax.lax.dynamic_update_slice_in_dim(
      cache["key_positions"], positions, index, axis=1)
  slots = jnp.broadcast_to(index + jnp.arange(length), (batch, length))
  mask = visibility(cfg, key_mask, slots, key_positions, positions)
  variables = {"params": params} if lora is None else {"params": params, "lora": lora}
  logits, kv = Decoder(cfg).apply(variables, inputs_embeds, positions, mask,
                                  cache={"k": cache["k"], "v": cache["v"]}, cache_index=index)
  new_cache = {"k": kv["k"], "v": kv["v"], "key_mask": key_mask, "key_positions": key_positions,
               "index": index + length}
  return logits, new_cache


def init_params(cfg: DecoderConfig, rng: jax.Array, boxed: bool = False):
  """Random parameters (with logical-axis boxes when `boxed`, for sharding)."""
  embeds = jnp.zeros((1, 1, cfg.hidden_size), cfg.compute_dtype)
  positions = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1, 1), bool)
  variables = Decoder(cfg).init(rng, embeds, positions, mask)
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)
