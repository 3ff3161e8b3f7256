"""The jitted train step: reconstruction and instruction losses from one batch, one update.

Gradients flow to the trainable tree only; microbatches accumulate with lax.scan; non-finite steps are skipped.
"""

import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

from e2llm_jax import sharding
from e2llm_jax.models import e2llm
from e2llm_jax.training.state import TrainSetup


def loss_weights(config, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(instruction, reconstruction) weights; during `loss.recon_warmup_steps` only reconstruction."""
  ift = jnp.asarray(config.loss.ift_weight, jnp.float32)
  recon = jnp.asarray(config.loss.recon_weight, jnp.float32)
  warmup = int(config.loss.recon_warmup_steps)
  if warmup > 0:
    in_warmup = step < warmup
    ift = jnp.where(in_warmup, 0.0, ift)
    recon = jnp.where(in_warmup, jnp.maximum(recon, 1.0), recon)
  return ift, recon


def _split_microbatches(batch: dict, count: int) -> dict:
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"train.batch_size ({x.shape[0]}) must be a multiple of "
                       f"train.microbatches ({count}).")
    return x.reshape(count, x.shape[0] // count, *x.shape[1:])
  return jax.tree.map(split, batch)


def make_train_step(config, setup: TrainSetup, batch_example: dict):
  """jit(step) with explicit in/out shardings and the state donated: (state, frozen, batch) →
  (state, metrics)."""
  cfg, tx = setup.model, setup.optimizer
  microbatches = int(config.train.microbatches)
  deterministic = float(config.lora.dropout) == 0.0

  def train_step(state, frozen, batch):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    ift_weight, recon_weight = loss_weights(config, state["step"])
    token_mask = batch["target_mask"].astype(jnp.float32)
    is_recon = (batch["task"] == e2llm.TASK_RECON).astype(jnp.float32)[:, None]
    ift_total = jnp.maximum(jnp.sum(token_mask * (1 - is_recon)), 1.0)
    recon_total = jnp.maximum(jnp.sum(token_mask * is_recon), 1.0)

    def loss_fn(trainable, micro, micro_rng):
      sums = e2llm.loss_sums(cfg, frozen, trainable, micro, deterministic, micro_rng)
      loss = (ift_weight * sums["ift_nll"] / ift_total
              + recon_weight * sums["recon_nll"] / recon_total)
      return loss, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (loss, sums), grads = grad_fn(state["trainable"], batch, step_rng)
    else:
      def accumulate(carry, inputs):
        micro, micro_rng = inputs
        (loss, sums), grads = grad_fn(state["trainable"], micro, micro_rng)
        return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None
      micro_batches = _split_microbatches(batch, microbatches)
      zeros = (jnp.zeros(()), {k: jnp.zeros(()) for k in e2llm.LOSS_SUM_KEYS},
               jax.tree.map(jnp.zeros_like, state["trainable"]))
      (loss, sums, grads), _ = jax.lax.scan(
          accumulate, zeros,
        (micro_batches, jax.random.split(step_rng, microbatches)))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "trainable": keep_new(trainable, state["trainable"]),
        "opt_state": keep_new(opt_state, state["opt_state"]),
        "rng": jax.random.key_data(rng),
        "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
    }
    metrics = {
        "loss": loss,
        # NaN (null in metrics.jsonl) when a batch has no example of that task, rather than 0.
        "ift_loss": jnp.where(sums["ift_tokens"] > 0, sums["ift_nll"] / ift_total, jnp.nan),
        "recon_loss": jnp.where(sums["recon_tokens"] > 0, sums["recon_nll"] / recon_total,
                                jnp.nan),
        "ift_tokens": sums["ift_tokens"],
        "recon_tokens": sums["recon_tokens"],
        "ift_token_accuracy": sums["ift_correct"] / ift_total,
        "grad_norm": grad_norm,
        "lr": setup.schedules["lora"](state["step"]),
        "adapter_lr": setup.schedules["head"](state["step"]),
        "skipped": (~finite).astype(jnp.int32),
        "bad_steps": new_state["bad_steps"],
        "chunks_dropped": jnp.sum(batch["chunks_dropped"]) if "chunks_dropped" in batch
                          else jnp.zeros((), jnp.int32),
        "decoder_tokens": jnp.sum(batch["prefix_mask"]) + jnp.sum(batch["query_mask"])
                          + jnp.sum(batch["target_mask"])
                          + jnp.sum(e2llm.soft_token_mask(cfg, batch["chunk_mask"],
                                                          batch["chunk_token_mask"])),
        "encoder_tokens": jnp.sum(batch["chunk_token_mask"]),
    }
    return new_state, metrics

  replicated = sharding.replicated(setup.mesh)
  batch_shardings = batch_shardings_for(config, setup.mesh, batch_example)
  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, setup.frozen_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, replicated),
                 donate_argnames=("state",))


def compile_with_memory_report(train_step, state, frozen, batch, stream=None):
  """Compile the jitted step for these arrays before step 1 and print (process 0) what XLA plans
  to hold on each device; returns the compiled step, which later calls use as they are."""
  compiled = train_step.lower(state, frozen, batch).compile()
  if jax.process_index() == 0:
    print(memory_report(compiled), file=stream or sys.stderr, flush=True)
  return compiled


def memory_report(compiled) -> str:
  """One line: per-device bytes of the compiled SPMD step (arguments, outputs, temporaries)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return "train step memory per device: not reported by this backend"
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  shardings = jax.tree.leaves(compiled.input_shardings)
  devices = len(shardings[0].device_set) if shardings else 1
  return (f"train step memory per device ({devices} devices, same plan on each): arguments "
          f"{mib(stats.argument_size_in_bytes)}, outputs {mib(stats.output_size_in_bytes)} "
          f"({mib(stats.alias_size_in_bytes)} reuse donated inputs), temporaries "
          f"{mib(stats.temp_size_in_bytes)}, code {mib(stats.generated_code_size_in_bytes)}")


def batch_shardings_for(config, mesh, batch_example: dict) -> dict:
  return {k: sharding.batch_sharding(mesh, config.mesh.rules, v.ndim)
          for k, v in batch_example.items()}

