"""E2LLM: chunks → encoder (+LoRA) → pooling → adapter → soft tokens spliced into the decoder (+LoRA).

The only place the two towers meet. Decoder sequence = prefix ‖ soft(N·k) ‖ query ‖ target, with masks.
"""

import dataclasses
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from e2llm_jax.data.tasks import TASK_INSTRUCTION as TASK_IFT, TASK_RECONSTRUCTION as TASK_RECON
from e2llm_jax.models import bert, layers, llama, lora
from e2llm_jax.models.adapter import Adapter

BATCH_KEYS = ("chunk_ids", "chunk_token_mask", "chunk_mask", "prefix_ids", "prefix_mask",
              "query_ids", "query_mask", "target_ids", "target_mask", "task")
LOSS_SUM_KEYS = ("ift_nll", "recon_nll", "ift_tokens", "recon_tokens", "ift_correct")


@dataclasses.dataclass(frozen=True)
class E2LLMConfig:
  encoder: bert.EncoderConfig
  decoder: llama.DecoderConfig
  pooling: str = "mean"
  tokens_per_chunk: int = 1
  pma_heads: int = 4
  adapter_hidden: int = 0  # 0: the decoder width
  encoder_lora: lora.LoRAConfig | None = None
  decoder_lora: lora.LoRAConfig | None = None

  def pooling_module(self) -> bert.Pooling:
    return bert.Pooling(self.pooling, self.encoder.hidden_size, num_tokens=self.tokens_per_chunk,
                        num_heads=self.pma_heads)

  def adapter_module(self) -> Adapter:
    return Adapter(self.adapter_hidden or self.decoder.hidden_size, self.decoder.hidden_size,
                   dtype=self.decoder.dtype)


def init_trainable(cfg: E2LLMConfig, frozen: Any, rng: jax.Array, boxed: bool = False) -> dict:
  """Trainable tree: encoder LoRA, pooling head (PMA only), adapter, decoder LoRA.

  `frozen` may be abstract (ShapeDtypeStructs): only shapes are read.
  """
  enc_rng, pool_rng, adapter_rng, dec_rng = jax.random.split(rng, 4)
  width = cfg.encoder.hidden_size
  trainable = {}
  if cfg.encoder_lora is not None:
    trainable["encoder_lora"] = lora.init(enc_rng, frozen["encoder"], cfg.encoder_lora)
  hidden = jnp.zeros((1, 2, width), jnp.float32)
  pooling_vars = cfg.pooling_module().init(pool_rng, hidden, jnp.ones((1, 2), jnp.int32))
  if "params" in pooling_vars:
    trainable["pooling"] = pooling_vars["params"]
  trainable["adapter"] = cfg.adapter_module().init(
      adapter_rng, jnp.zeros((1, width), jnp.float32))["params"]
  if cfg.decoder_lora is not None:
    trainable["decoder_lora"] = lora.init(dec_rng, frozen["decoder"], cfg.decoder_lora)
  return trainable if boxed else nn.meta.unbox(trainable)


def scaled_lora(trainable: Any, name: str, config: lora.LoRAConfig | None):
  """The LoRA tree `name` scaled by alpha/rank, or None when that tower has no LoRA."""
  if config is None or name not in trainable:
    return None
  return lora.scaled(trainable[name], config.scale)


def merge_lora(cfg: E2LLMConfig, frozen: Any, trainable: Any) -> tuple[dict, dict]:
  """(frozen, trainable) computing the same function with each float32 tower's LoRA merged into
  its kernels and gone from `trainable`: one matmul per projection instead of three (inference).

  A tower stored in another dtype keeps its LoRA apart: rounding `kernel + scale · a @ b` to
  bfloat16 would drop the low bits of the update the training learned."""
  frozen, trainable = dict(frozen), dict(trainable)
  for tower, config in (("encoder", cfg.encoder_lora), ("decoder", cfg.decoder_lora)):
    name = f"{tower}_lora"
    kernels = [leaf for path, leaf in traverse_util.flatten_dict(frozen[tower]).items()
               if path[-1] == "kernel"]
    if config is None or name not in trainable or any(k.dtype != jnp.float32 for k in kernels):
      continue
    frozen[tower] = lora.merge(frozen[tower], trainable.pop(name), config.scale)
  return frozen, trainable


def frozen_at_rest(frozen: dict) -> dict:
  """Both towers with the 16-bit kernels of their layer stacks held packed
  (`layers.kernels_at_rest`): the form for jitted calls on a CPU to take, made once."""
  return {tower: layers.kernels_at_rest(params) for tower, params in frozen.items()}


def soft_tokens(cfg: E2LLMConfig, frozen: Any, trainable: Any, chunk_ids: jax.Array,
                chunk_token_mask: jax.Array, deterministic: bool = True, rng=None,
                grouped: bool = True, differentiated: bool = False) -> jax.Array:
  """Chunk ids [B,N,T] → soft tokens [B,N·k,D_decoder]; every chunk is encoded in parallel
  (in groups when `grouped`; see `bert.encode` for `differentiated`, which the train step
  passes)."""
  batch, num_chunks, length = chunk_ids.shape
  flat_ids = chunk_ids.reshape(batch * num_chunks, length)
  flat_mask = chunk_token_mask.reshape(batch * num_chunks, length)
  rngs = None if deterministic or rng is None else {"dropout": rng}
  pool = lambda hidden, mask: cfg.pooling_module().apply(
      {"params": trainable.get("pooling", {})}, hidden.astype(jnp.float32), mask)
  pooled = bert.encode(cfg.encoder, frozen["encoder"], flat_ids, flat_mask,
                       lora=scaled_lora(trainable, "encoder_lora", cfg.encoder_lora),
                       deterministic=deterministic, rngs=rngs, grouped=grouped, pool=pool,
                       differentiated=differentiated)
  soft = cfg.adapter_module().apply({"params": trainable["adapter"]}, pooled)
  return soft.reshape(batch, num_chunks * cfg.tokens_per_chunk, -1)


def text_token_mask(token_mask: jax.Array) -> jax.Array:
  """[..., T] 1 at a chunk's text tokens: real, not the first ([CLS]) nor the last real ([SEP]).

  numpy in, numpy out (the inference engine's host-side masks compile nothing)."""
  xp = np if isinstance(token_mask, np.ndarray) else jnp
  real = token_mask.astype(bool)
  next_real = xp.concatenate([real[..., 1:], xp.zeros_like(real[..., :1])], axis=-1)
  not_first = xp.arange(real.shape[-1]) > 0
  return (real & next_real & not_first).astype(xp.int32)


def soft_token_mask(cfg: E2LLMConfig, chunk_mask: jax.Array, chunk_token_mask: jax.Array
                    ) -> jax.Array:
  """[B, N·k] 1 at the soft tokens the decoder reads: every slot of a real chunk, or with pooling
  `tokens` the slots of its text tokens (`chunk_token_mask` [B,N,T]). numpy in, numpy out."""
  xp = np if isinstance(chunk_mask, np.ndarray) else jnp
  chunk_mask = chunk_mask.astype(xp.int32)
  if cfg.pooling == "tokens":
    slots = chunk_mask[..., None] * text_token_mask(chunk_token_mask)
    return slots.reshape(chunk_mask.shape[0], -1)
  return xp.repeat(chunk_mask, cfg.tokens_per_chunk, axis=1)


def _embed(cfg: E2LLMConfig, frozen, ids):
  return llama.embed(cfg.decoder, frozen["decoder"], ids)


def splice(cfg: E2LLMConfig, frozen: Any, soft: jax.Array, batch: dict,
           with_target: bool = True, soft_mask: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Decoder inputs_embeds [B,S,D] and mask [B,S] for prefix ‖ soft ‖ query (‖ target).

  Masked slots may sit anywhere: positions count only real tokens and padded keys are never seen.
  """
  pieces = [_embed(cfg, frozen, batch["prefix_ids"]), soft.astype(cfg.decoder.compute_dtype),
            _embed(cfg, frozen, batch["query_ids"])]
  if soft_mask is None:
    soft_mask = soft_token_mask(cfg, batch["chunk_mask"], batch["chunk_token_mask"])
  masks = [batch["prefix_mask"], soft_mask, batch["query_mask"]]
  if with_target:
    pieces.append(_embed(cfg, frozen, batch["target_ids"]))
    masks.append(batch["target_mask"])
  return (jnp.concatenate(pieces, axis=1),
          jnp.concatenate([m.astype(jnp.int32) for m in masks], axis=1))


def last_real_index(mask: jax.Array) -> jax.Array:
  """Index [B] of the last real slot of each row (0 for an empty row)."""
  slots = jnp.arange(mask.shape[-1])
  return jnp.max(jnp.where(mask.astype(bool), slots, 0), axis=-1)


def target_logits(cfg: E2LLMConfig, frozen: Any, trainable: Any, batch: dict,
                  deterministic: bool = True, rng=None, soft: jax.Array | None = None,
                  soft_mask: jax.Array | None = None) -> jax.Array:
  """Logits [B,A,V] that predict each target token (teacher forcing), computed only there.

  The training loss's path: chunks are encoded in groups where `bert.groups_under_gradient` says
  so (one CPU device), else as one batch. Given `soft` [B,S,D] (and its `soft_mask` [B,S]), those
  vectors stand in for the encoded chunks: a probe of what the decoder makes of other inputs in
  the soft slots."""
  enc_rng, dec_rng = (None, None) if rng is None else jax.random.split(rng)
  if soft is None:
    soft = soft_tokens(cfg, frozen, trainable, batch["chunk_ids"], batch["chunk_token_mask"],
                       deterministic, enc_rng, differentiated=True)
  embeds, mask = splice(cfg, frozen, soft, batch, soft_mask=soft_mask)
  decoder_lora = scaled_lora(trainable, "decoder_lora", cfg.decoder_lora)
  rngs = None if deterministic or dec_rng is None else {"dropout": dec_rng}
  hidden = llama.decoder_forward(cfg.decoder, frozen["decoder"], inputs_embeds=embeds,
                                 attention_mask=mask, lora=decoder_lora,
                                 deterministic=deterministic, rngs=rngs, return_hidden=True)
  target_len = batch["target_ids"].shape[1]
  target_start = embeds.shape[1] - target_len
  # Target token 0 is predicted by the last real slot before the target; token j>0 by token j-1.
  first = last_real_index(mask[:, :target_start])
  rest = target_start + jnp.arange(target_len - 1)
  index = jnp.concatenate([first[:, None], jnp.broadcast_to(rest, (mask.shape[0], target_len - 1))],
                          axis=1)
  selected = jnp.take_along_axis(hidden, index[..., None], axis=1)
  return llama.logits_from_hidden(cfg.decoder, frozen["decoder"], selected, lora=decoder_lora,
                                  deterministic=deterministic, rngs=rngs)


def loss_sums(cfg: E2LLMConfig, frozen: Any, trainable: Any, batch: dict,
              deterministic: bool = True, rng=None) -> dict:
  """Cross-entropy sums and target-token counts, split by task (instruction vs reconstruction)."""
  logits = target_logits(cfg, frozen, trainable, batch, deterministic, rng)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
  token_mask = batch["target_mask"].astype(jnp.float32)
  is_recon = (batch["task"] == TASK_RECON).astype(jnp.float32)[:, None]
  correct = (jnp.argmax(logits, axis=-1) == batch["target_ids"]).astype(jnp.float32) * token_mask
  return {
      "ift_nll": jnp.sum(nll * token_mask * (1 - is_recon)),
      "recon_nll": jnp.sum(nll * token_mask * is_recon),
      "ift_tokens": jnp.sum(token_mask * (1 - is_recon)),
      "recon_tokens": jnp.sum(token_mask * is_recon),
      "ift_correct": jnp.sum(correct * (1 - is_recon)),
  }


def generate(cfg: E2LLMConfig, frozen: Any, trainable: Any, batch: dict, max_new_tokens: int,
             eos_token_id: int | None = None) -> jax.Array:
  """Greedy continuation [B,max_new_tokens] of prefix ‖ soft ‖ query, with a KV cache.

  Tokens after an end-of-sequence are set to `eos_token_id` (or kept when it is None).
  """
  soft = soft_tokens(cfg, frozen, trainable, batch["chunk_ids"], batch["chunk_token_mask"])
  embeds, mask = splice(cfg, frozen, soft, batch, with_target=False)
  decoder_lora = scaled_lora(trainable, "decoder_lora", cfg.decoder_lora)
  batch_size, prompt_len = mask.shape
  cache = llama.init_cache(cfg.decoder, batch_size, prompt_len + max_new_tokens)
  logits, cache = llama.decoder_step(cfg.decoder, frozen["decoder"], cache, inputs_embeds=embeds,
                                     attention_mask=mask, lora=decoder_lora)
  last = jnp.take_along_axis(logits, last_real_index(mask)[:, None, None], axis=1)[:, 0]
  token = jnp.argmax(last, axis=-1).astype(jnp.int32)
  done = jnp.zeros((batch_size,), bool)

  def step(carry, _):
    token, cache, done = carry
    out = token if eos_token_id is None else jnp.where(done, eos_token_id, token)
    done = done | (False if eos_token_id is None else token == eos_token_id)
    logits, cache = llama.decoder_step(cfg.decoder, frozen["decoder"], cache,
                                       inputs_embeds=_embed(cfg, frozen, token[:, None]),
                                       lora=decoder_lora)
    return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache, done), out

  _, tokens = jax.lax.scan(step, (token, cache, done), None, length=max_new_tokens)
  return tokens.T
