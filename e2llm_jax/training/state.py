"""Train state: frozen base towers apart from the trainable tree, the optimizer, and sharded creation.

State is built as eval_shape → shardings from the logical rules → jit(init, out_shardings); weights stream into shards.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from e2llm_jax import sharding, towers
from e2llm_jax.models import e2llm

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
  cfg, numpy_weights = towers.load_model(config)
  rng = jax.random.key(config.seed)
  frozen_rng, trainable_rng, step_rng = jax.random.split(rng, 3)
  frozen, frozen_shardings = towers.frozen_towers(
      cfg, numpy_weights, mesh, rules, frozen_rng, with_weights,
      replicated_warn_share=float(config.mesh.replicated_warn_share))
  abstract_frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
  abstract_trainable, trainable_shardings = towers.trainable_layout(cfg, abstract_frozen, mesh,
                                                                    rules, trainable_rng)
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
  return TrainSetup(cfg, mesh, state, frozen, state_shardings, frozen_shardings, tx, schedules,
                    towers.base_paths(config))
