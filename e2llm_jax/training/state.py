"""Train state: frozen base towers apart from the trainable tree, the optimizer, and sharded creation.

State is built as eval_shape → shardings from the logical rules → jit(init, out_shardings); weights stream into shards.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from e2llm_jax import sharding
from e2llm_jax.models import bert, e2llm, llama, lora

LORA_GROUPS = ("encoder_lora", "decoder_lora")


@dataclasses.dataclass
class TrainSetup:
  """Everything the loop needs: model config, arrays, shardings and the optimizer."""
  model: e2llm.E2LLMConfig
  mesh: jax.sharding.Mesh
  state: dict
  frozen: dict
  state_shardings: Any
  frozen_shardings: Any
  optimizer: optax.GradientTransformation
  schedules: dict
  base_paths: dict  # tower name → path of its pretrained weights ("" for random init)


def _tower_config(section, tower: str, compute_dtype: str, remat: bool, lora_dropout: float):
  """(config, numpy params or None) for one tower: pretrained from a path or random-init sizes."""
  common = dict(dtype=compute_dtype, remat=remat, lora_dropout=lora_dropout)
  if section.path:
    from e2llm_jax import hf  # import weights only when a path is given
    load = hf.load_encoder if tower == "encoder" else hf.load_decoder
    cfg, params = load(str(section.path))
    return dataclasses.replace(cfg, **common), params
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
  compute, remat, dropout = config.model.compute_dtype, config.model.remat, config.lora.dropout
  enc_cfg, enc_params = _tower_config(config.model.encoder, "encoder", compute, remat, dropout)
  dec_cfg, dec_params = _tower_config(config.model.decoder, "decoder", compute, remat, dropout)
  return model_config(config, enc_cfg, dec_cfg), {"encoder": enc_params, "decoder": dec_params}


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
    placed[key] = jax.make_array_from_callback(array.shape, flat_sh[key],
                                               lambda index, a=array: a[index])
  return traverse_util.unflatten_dict(placed)


def _param_labels(trainable):
  return {name: jax.tree.map(lambda _: "lora" if name in LORA_GROUPS else "head", subtree)
          for name, subtree in trainable.items()}


def make_optimizer(config, trainable) -> tuple[optax.GradientTransformation, dict]:
  """AdamW with warm-up + cosine decay and global-norm clipping, over the trainable tree only.

  LoRA and the adapter/pooling head may have separate learning rates (`optim.adapter_lr`).
  """
  optim, steps = config.optim, max(int(config.train.steps), 1)
  warmup = min(int(optim.warmup_steps), max(steps - 1, 0))

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=peak * optim.end_lr_ratio)

  schedules = {"lora": schedule(optim.lr), "head": schedule(optim.adapter_lr or optim.lr)}
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, trainable)

  def adamw(group):
    return optax.adamw(schedules[group], b1=optim.b1, b2=optim.b2,
                       weight_decay=optim.weight_decay, mask=decay_mask)

  labels = _param_labels(trainable)
  clip = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  tx = optax.chain(*clip,
                   optax.multi_transform({"lora": adamw("lora"), "head": adamw("head")}, labels))
  return tx, schedules


def create_train_state(config, mesh, *, with_weights: bool = True) -> TrainSetup:
  """Sharded frozen towers and train state on `mesh`.

  Frozen weights: pretrained ones stream into their shards; random-init towers are created
  already sharded by a jitted init. With `with_weights=False` the frozen tree is left abstract
  (for a restore that brings its own random-init base).
  """
  rules = config.mesh.rules
  cfg, numpy_weights = load_model(config)
  rng = jax.random.key(config.seed)
  frozen_rng, trainable_rng, step_rng = jax.random.split(rng, 3)

  boxed_frozen = jax.eval_shape(_boxed_frozen_init(cfg), frozen_rng)
  frozen_shardings = sharding.shardings_for(boxed_frozen, mesh, rules)
  abstract_frozen = nn.meta.unbox(boxed_frozen)
  init_frozen = jax.jit(lambda r: nn.meta.unbox(_boxed_frozen_init(cfg)(r)),
                        out_shardings=frozen_shardings)
  frozen = {}
  for tower in ("encoder", "decoder"):
    if numpy_weights[tower] is not None:
      frozen[tower] = _place(numpy_weights[tower], abstract_frozen[tower], frozen_shardings[tower])
  if len(frozen) < 2:
    randoms = init_frozen(frozen_rng) if with_weights else abstract_frozen
    for tower in ("encoder", "decoder"):
      frozen.setdefault(tower, randoms[tower])

  boxed_trainable = jax.eval_shape(
      lambda r: e2llm.init_trainable(cfg, abstract_frozen, r, boxed=True), trainable_rng)
  trainable_shardings = sharding.shardings_for(boxed_trainable, mesh, rules)
  abstract_trainable = nn.meta.unbox(boxed_trainable)
  tx, schedules = make_optimizer(config, abstract_trainable)
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  replicated = sharding.replicated(mesh)
  opt_shardings = sharding.shardings_following_params(abstract_opt, trainable_shardings, mesh)
  state_shardings = {"step": replicated, "trainable": trainable_shardings,
                     "opt_state": opt_shardings, "rng": replicated, "bad_steps": replicated}

  def init_state(r):
    trainable = e2llm.init_trainable(cfg, abstract_frozen, r)
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
            "opt_state": tx.init(trainable), "rng": jax.random.key_data(step_rng),
            "bad_steps": jnp.zeros((), jnp.int32)}

  state = jax.jit(init_state, out_shardings=state_shardings)(trainable_rng)
  base_paths = {"encoder": str(config.model.encoder.path or ""),
                "decoder": str(config.model.decoder.path or "")}
  return TrainSetup(cfg, mesh, state, frozen, state_shardings, frozen_shardings, tx, schedules,
                    base_paths)
