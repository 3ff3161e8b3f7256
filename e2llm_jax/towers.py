"""The model a config describes: tower configs, pretrained weights streamed into shards, random towers.

Shared by training (train state) and inference (an engine from a workdir); holds no optimizer state.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e2llm_jax import sharding
from e2llm_jax.models import bert, e2llm, llama, lora, stacking

TOWERS = ("encoder", "decoder")


def _tower_config(section, tower: str, common: dict):
  """(config, numpy params or None) for one tower: pretrained from a path or random-init sizes.

  `common`: the run-time numerics both towers take from the config (dtype, remat, attention...).
  """
  if section.path:
    from e2llm_jax import hf  # import weights only when a path is given
    load = hf.load_encoder if tower == "encoder" else hf.load_decoder
    cfg, params = load(str(section.path))
    cfg = dataclasses.replace(cfg, **common)
    return cfg, stacking.in_layout(params, cfg, consume=True)
  sizes = dict(section.random_init)
  if tower == "encoder":
    return bert.EncoderConfig(**sizes, **common), None
  sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_heads"])
  sizes.setdefault("num_kv_heads", sizes["num_heads"])
  return llama.DecoderConfig(**sizes, **common), None


def model_config(config, encoder_cfg, decoder_cfg) -> e2llm.E2LLMConfig:
  def lora_config(rank, alpha, targets):
    return lora.LoRAConfig(rank, alpha, targets, config.lora.dropout) if rank > 0 else None
  return e2llm.E2LLMConfig(
      encoder=encoder_cfg, decoder=decoder_cfg, pooling=config.model.pooling,
      tokens_per_chunk=config.model.tokens_per_chunk, pma_heads=config.model.pma_heads,
      adapter_hidden=config.model.adapter_hidden,
      encoder_lora=lora_config(config.lora.encoder_rank, config.lora.encoder_alpha,
                               config.lora.encoder_targets),
      decoder_lora=lora_config(config.lora.decoder_rank, config.lora.decoder_alpha,
                               config.lora.decoder_targets))


def load_model(config) -> tuple[e2llm.E2LLMConfig, dict]:
  """Model config and the pretrained numpy weights of each tower (None where random-init)."""
  model = config.model
  common = dict(dtype=model.compute_dtype, remat=model.remat, remat_policy=model.remat_policy,
                scan_layers=model.scan_layers, lora_dropout=config.lora.dropout,
                attention=model.attention, attention_block_q=model.attention_block_q,
                attention_block_k=model.attention_block_k)
  enc_cfg, enc_params = _tower_config(model.encoder, "encoder", common)
  dec_cfg, dec_params = _tower_config(model.decoder, "decoder", common)
  return model_config(config, enc_cfg, dec_cfg), {"encoder": enc_params, "decoder": dec_params}


def base_paths(config) -> dict:
  """Tower name → path of its pretrained weights ("" for random init)."""
  return {tower: str(config.model[tower].path or "") for tower in TOWERS}


def _boxed_frozen_init(cfg: e2llm.E2LLMConfig):
  def init(rng):
    enc_rng, dec_rng = jax.random.split(rng)
    return {"encoder": bert.init_params(cfg.encoder, enc_rng, boxed=True),
            "decoder": llama.init_params(cfg.decoder, dec_rng, boxed=True)}
  return init


def _place(numpy_tree, abstract, shardings):
  """Stream numpy weights tensor by tensor into their shards (no replicated device copy)."""
  flat_np = traverse_util.flatten_dict(numpy_tree)
  flat_abs = traverse_util.flatten_dict(abstract)
  flat_sh = traverse_util.flatten_dict(shardings)
  if set(flat_np) != set(flat_abs):
    missing = sorted("/".join(k) for k in set(flat_abs) - set(flat_np))
    extra = sorted("/".join(k) for k in set(flat_np) - set(flat_abs))
    raise ValueError(f"Pretrained weights do not match the model: missing {missing[:8]}, "
                     f"unexpected {extra[:8]}.")
  placed = {}
  for key in flat_abs:
    array = np.asarray(flat_np.pop(key), dtype=flat_abs[key].dtype)
    if array.shape != flat_abs[key].shape:
      raise ValueError(f"Weight {'/'.join(key)} has shape {array.shape}, the model expects "
                       f"{flat_abs[key].shape}.")
    # Waiting for each copy lets the host array go before the next is read: placed
    # asynchronously, all host copies stayed alive beside the device ones (on CPU, twice the
    # weights' memory at the peak; bench/RESULTS.md).
    placed[key] = jax.make_array_from_callback(array.shape, flat_sh[key],
                                               lambda index, a=array: a[index]).block_until_ready()
  return traverse_util.unflatten_dict(placed)


def stored_dtypes(cfg: e2llm.E2LLMConfig, abstract: dict) -> dict:
  """`abstract` frozen towers with the dtype each weight is kept in: the tower's compute dtype for
  what the model only ever reads cast to it (Dense kernels and biases, the decoder's token
  table), float32 for the rest (norms, BERT's embeddings, which are summed before their cast).

  Same numbers either way; stored as float32, a bfloat16 train step converted every kernel again
  every step (6% of its op time, bench/RESULTS.md) and held the weights twice as large.
  """
  stored = {}
  for tower, tree in abstract.items():
    compute = (cfg.encoder if tower == "encoder" else cfg.decoder).compute_dtype
    flat = traverse_util.flatten_dict(tree)
    read_cast = lambda path: (path[-1] == "kernel" or path[-2:] == ("embed_tokens", "embedding")
                              or (path[-1] == "bias" and path[:-1] + ("kernel",) in flat))
    stored[tower] = traverse_util.unflatten_dict({
        path: jax.ShapeDtypeStruct(leaf.shape, compute) if read_cast(path)
        and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for path, leaf in flat.items()})
  return stored


def frozen_towers(cfg: e2llm.E2LLMConfig, numpy_weights: dict, mesh, rules, rng: jax.Array,
                  with_weights: bool = True, replicated_warn_share: float = 1.0
                  ) -> tuple[dict, Any]:
  """(frozen towers, their shardings) on `mesh`.

  Pretrained weights stream into their shards; random-init towers are created already sharded by a
  jitted init, or left abstract with `with_weights=False` (for a restore that brings its own).
  Warns when more than `replicated_warn_share` of their bytes stay whole on an axis that does not
  divide them.
  """
  boxed = jax.eval_shape(_boxed_frozen_init(cfg), rng)
  shardings = sharding.shardings_for(boxed, mesh, rules)
  sharding.warn_replicated(boxed, mesh, rules, replicated_warn_share)
  abstract = stored_dtypes(cfg, nn.meta.unbox(boxed))
  frozen = {}
  for tower in TOWERS:
    if numpy_weights[tower] is not None:
      frozen[tower] = _place(numpy_weights[tower], abstract[tower], shardings[tower])
  if len(frozen) < len(TOWERS):
    init = jax.jit(lambda r: jax.tree.map(lambda x, a: x.astype(a.dtype),
                                          nn.meta.unbox(_boxed_frozen_init(cfg)(r)), abstract),
                   out_shardings=shardings)
    randoms = init(rng) if with_weights else abstract
    for tower in TOWERS:
      frozen.setdefault(tower, randoms[tower])
  return frozen, shardings


def trainable_layout(cfg: e2llm.E2LLMConfig, abstract_frozen: Any, mesh, rules,
                     rng: jax.Array) -> tuple[Any, Any]:
  """(abstract trainable tree, its shardings): LoRA, pooling head and adapter."""
  boxed = jax.eval_shape(lambda r: e2llm.init_trainable(cfg, abstract_frozen, r, boxed=True), rng)
  return nn.meta.unbox(boxed), sharding.shardings_for(boxed, mesh, rules)
