"""The BERT-family chunk encoder (MiniLM, GTE, BGE, E5) as HF `BertModel`, and chunk pooling.

Pooling turns a chunk's token outputs into `k` vectors: `cls`, masked `mean`, or `pma` (learned seeds).
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2llm_jax.config_utils import ONE_VECTOR_POOLINGS, POOLINGS
from e2llm_jax.models import attention, layers, packing, stacking


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT-family encoder plus run-time numerics (dtype, remat, LoRA dropout)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  model_type: str = "bert"
  initializer_range: float = 0.02
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name, used when remat
  scan_layers: bool = True  # params stacked as `layer` [num_layers, ...], else `layer_<i>`
  lora_dropout: float = 0.0
  attention: str = "auto"  # attention.IMPLEMENTATIONS
  attention_block_q: int = 512  # blockwise kernel: queries and keys per block
  attention_block_k: int = 512

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


class EncoderLayer(nn.Module):
  """One post-LayerNorm BERT layer: x → (x, None), the shape a scan over layers takes."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.cfg
    dense = lambda n, axes, name: layers.Dense(
        n, axes, use_bias=True, dtype=cfg.compute_dtype, lora_dropout=cfg.lora_dropout,
        init_std=cfg.initializer_range, name=name)
    batch, length, _ = x.shape
    head_dim = cfg.hidden_size // cfg.num_heads
    split = lambda t: t.reshape(batch, length, cfg.num_heads, head_dim)
    q = split(dense(cfg.hidden_size, ("embed", "heads"), "query")(x, deterministic))
    k = split(dense(cfg.hidden_size, ("embed", "heads"), "key")(x, deterministic))
    v = split(dense(cfg.hidden_size, ("embed", "heads"), "value")(x, deterministic))
    attn = layers.attention(q, k, v, mask, cfg.attention, cfg.attention_block_q,
                            cfg.attention_block_k).reshape(batch, length, cfg.hidden_size)
    attn = dense(cfg.hidden_size, ("heads", "embed"), "attention_output")(attn, deterministic)
    x = layers.LayerNorm(cfg.layer_norm_eps, name="attention_norm")(x + attn)
    h = layers.activation(cfg.hidden_act)(
        dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x, deterministic))
    h = dense(cfg.hidden_size, ("mlp", "embed"), "output")(h, deterministic)
    return layers.LayerNorm(cfg.layer_norm_eps, name="output_norm")(x + h), None


class Encoder(nn.Module):
  """Post-LayerNorm BERT: returns the last hidden states [B,T,D]."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
    cfg = self.cfg
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    std = cfg.initializer_range
    x = (layers.Embed(cfg.vocab_size, cfg.hidden_size, init_std=std,
                      name="word_embeddings")(input_ids)
         + layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                        init_std=std, name="position_embeddings")(positions)
         + layers.Embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), init_std=std,
                        name="token_type_embeddings")(token_type_ids))
    x = layers.LayerNorm(cfg.layer_norm_eps, name="embeddings_norm")(x).astype(cfg.compute_dtype)
    mask = attention.key_padding_mask(attention_mask)
    layer_cls = layers.layer_class(EncoderLayer, cfg.remat_policy if cfg.remat else None,
                                   static_argnums=(3,), scanned=cfg.scan_layers)
    if cfg.scan_layers:
      scanned = layers.scanned(layer_cls, cfg.num_layers, (nn.broadcast, nn.broadcast),
                                self.is_initializing())
      x, _ = scanned(cfg, name=stacking.ENCODER_LAYERS)(x, mask, deterministic)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer_cls(cfg, name=f"{stacking.ENCODER_LAYERS}_{i}")(x, mask, deterministic)
    return x


class Pooling(nn.Module):
  """Chunk outputs [B,T,D] → [B,k,D] by `cls`, masked `mean`, `pma`, or `tokens` (k = T: every
  position kept; `e2llm.soft_token_mask` hides the special and padding ones).

  `pma` is pooling by multi-head attention: k learned seeds attend over the chunk's real tokens,
  then residual + LayerNorm + FFN + residual + LayerNorm (Set Transformer's PMA block).
  """
  kind: str
  hidden_size: int
  num_tokens: int = 1
  num_heads: int = 4
  ffn_size: int | None = None
  eps: float = 1e-5

  def __post_init__(self):
    if self.kind not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.kind!r}; choose one of {POOLINGS}.")
    if self.kind in ONE_VECTOR_POOLINGS and self.num_tokens != 1:
      raise ValueError(f"Pooling {self.kind!r} gives one token per chunk, but "
                       f"tokens_per_chunk={self.num_tokens}; use pooling 'pma' for several.")
    if self.kind == "pma" and self.hidden_size % self.num_heads:
      raise ValueError(f"PMA heads ({self.num_heads}) must divide the encoder width "
                       f"({self.hidden_size}).")
    super().__post_init__()

  @nn.compact
  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    if self.kind == "cls":
      return hidden[:, :1, :]
    if self.kind == "tokens":
      return hidden
    mask_f = mask.astype(hidden.dtype)[..., None]
    if self.kind == "mean":
      total = jnp.sum(hidden * mask_f, axis=1, keepdims=True)
      return total / jnp.maximum(jnp.sum(mask_f, axis=1, keepdims=True), 1.0)
    width, heads = self.hidden_size, self.num_heads
    batch, length, _ = hidden.shape
    seeds = self.param("seeds", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                             (None, "embed")),
                       (self.num_tokens, width))
    dense = lambda n, axes, name: layers.Dense(n, axes, use_bias=True, name=name)
    query = jnp.broadcast_to(seeds, (batch, self.num_tokens, width))
    q = dense(width, ("embed", "heads"), "query")(query).reshape(
        batch, self.num_tokens, heads, width // heads)
    k = dense(width, ("embed", "heads"), "key")(hidden).reshape(batch, length, heads, width // heads)
    v = dense(width, ("embed", "heads"), "value")(hidden).reshape(
        batch, length, heads, width // heads)
    attn_mask = mask.astype(bool)[:, None, None, :]
    attn = layers.attention(q, k, v, attn_mask).reshape(batch, self.num_tokens, width)
    h = layers.LayerNorm(self.eps, name="attention_norm")(
        query + dense(width, ("heads", "embed"), "attention_output")(attn))
    ffn = dense(width, ("mlp", "embed"), "ffn_out")(
        layers.gelu_exact(dense(self.ffn_size or 4 * width, ("embed", "mlp"), "ffn_in")(h)))
    return layers.LayerNorm(self.eps, name="output_norm")(h + ffn)


# At inference on a CPU many chunks are encoded in groups of about this many tokens, one group
# after another: each group's activations and attention logits stay cache-sized, and peak memory
# stops growing with the number of chunks (a CPU's matmuls still run at full rate at this size:
# MiniLM over 252 chunks took 0.99x the time of groups of 2048 tokens on a Xeon, 0.90-0.97x on an
# AVX2-only EPYC, bench/RESULTS.md).
# The train step groups them too, on one CPU device (`groups_under_gradient`): the group loop's
# backward keeps every group's activations, as one batch's would, but its dots and norms run on
# cache-sized groups as well. MiniLM's forward and backward over 64 chunks x 128 tokens took 0.88x
# the time of one batch, the train step 0.92x (AVX2 EPYC, 2026-12-07; it had been 1.8x slower on
# the Xeon on 2026-12-03, with the code of then, bench/RESULTS.md).
ENCODE_GROUP_TOKENS = 1024
# On accelerators (GPU, TPU) matmuls need far more rows to fill the chip: GTE-large over 256 chunks
# in groups of 2048 tokens took 1.6x the time of groups this large on an H200 (bench/RESULTS.md);
# there groups only bound memory.
ACCELERATOR_ENCODE_GROUP_TOKENS = 65536


def groups_under_gradient() -> bool:
  """Whether the train step encodes its chunks in groups (`packing.one_cpu_device`)."""
  return packing.one_cpu_device()


def encode(cfg: EncoderConfig, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
           lora: Any = None, deterministic: bool = True, rngs=None, grouped: bool = True,
           pool: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
           differentiated: bool = False) -> jax.Array:
  """Last hidden states [B,T,D] (float32 unless cfg.dtype says otherwise), or `pool(hidden, mask)`
  of them. `grouped` (without dropout) runs many chunks in groups of ENCODE_GROUP_TOKENS on a CPU
  and of ACCELERATOR_ENCODE_GROUP_TOKENS elsewhere, and applies `pool` to each group, so that only
  what it keeps of the hidden states is gathered. When differentiating, pass `differentiated=True`:
  then chunks run in groups only where `groups_under_gradient()` says so, and every group runs;
  otherwise the groups after the last chunk with a real token are not run (their outputs are
  zeros)."""
  variables = {"params": params} if lora is None else {"params": params, "lora": lora}
  pool = pool or (lambda hidden, mask: hidden)
  encoded = lambda ids, mask: pool(
      Encoder(cfg).apply(variables, ids, mask, deterministic=deterministic, rngs=rngs), mask)
  length = input_ids.shape[-1]
  on_cpu = jax.default_backend() == "cpu"
  tokens = ENCODE_GROUP_TOKENS if on_cpu else ACCELERATOR_ENCODE_GROUP_TOKENS
  group = max(tokens // max(length, 1), 1)
  if not grouped or not deterministic or (differentiated and not groups_under_gradient()):
    return encoded(input_ids, attention_mask)
  # The inference engine pads its calls to bucket sizes with whole chunks of padding, last: the
  # groups past the last real chunk are not run.
  rows_used = None if differentiated else 1 + jnp.max(
      jnp.where(jnp.any(attention_mask, axis=-1), jnp.arange(input_ids.shape[0]), -1))
  return packing.over_groups(encoded, group, input_ids, attention_mask, rows_used=rows_used)


def init_params(cfg: EncoderConfig, rng: jax.Array, boxed: bool = False):
  """Random parameters (with logical-axis boxes when `boxed`, for sharding)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  params = Encoder(cfg).init(rng, ids, jnp.ones_like(ids))["params"]
  return params if boxed else nn.meta.unbox(params)
