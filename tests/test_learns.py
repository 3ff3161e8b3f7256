"""E2LLM learns: a tiny model from random init solves passkey retrieval through its soft tokens.

With the soft tokens zeroed the same model is back at chance, so the answer can only come from the chunks.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from e2llm_jax import sharding
from e2llm_jax.data import passkey
from e2llm_jax.models import e2llm
from e2llm_jax.training import loop, state as state_lib, step as step_lib

STEPS = 2000
HELD_OUT = 256
DIGITS = 4
# The session builds at XLA's -O0 backend (conftest.py): fast to compile, slow to run. These 2000
# steps run 3x faster at XLA's default level 3.
FULL_OPTIMIZATION = {"xla_backend_optimization_level": 3}


def passkey_config():
  config = tiny.get_config()
  for tower in (config.model.encoder, config.model.decoder):
    # std ≈ 1/sqrt(width): each frozen random layer keeps a signal's scale. HF's 0.02 suits widths
    # near 1000; at 96 every frozen layer shrinks the chunk's signal five-fold.
    tower.random_init.update(hidden_size=96, intermediate_size=192, vocab_size=256,
                             initializer_range=0.1)
  config.model.pooling = "mean"
  config.model.tokens_per_chunk = 1
  config.model.adapter_hidden = 0
  # The encoder must tell the needle's digits apart by position: LoRA on every projection, rank 32.
  config.lora.encoder_rank, config.lora.encoder_alpha = 32, 64.0
  config.lora.encoder_targets = "query|key|value|attention_output|intermediate|output"
  config.lora.decoder_rank, config.lora.decoder_alpha = 8, 16.0
  config.lora.decoder_targets = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head"
  config.data.tasks = {"passkey": 1.0}
  # Four chunks of noise, one with the needle. 2000 steps of 16 reach 98% held out in half the time
  # of 800 of 64 (99.6%); eight chunks need 1000+ steps of 64 for 95%.
  config.data.max_chunks, config.data.chunk_tokens = 4, 16
  config.data.passkey.value_digits = DIGITS
  config.data.passkey.needle_at_chunk_start = True
  config.data.target_tokens = DIGITS + 1
  config.train.batch_size, config.train.steps = 16, STEPS
  # A full-rank adapter at the LoRA rate turns the soft tokens into one constant prompt within a
  # few hundred steps (chunk content < 1% of their norm, then no gradient); 10x slower, it doesn't.
  config.optim.lr, config.optim.adapter_lr, config.optim.warmup_steps = 1e-3, 1e-4, 50
  config.optim.weight_decay = 0.0
  config.mesh.shape = (1, 1, 1)
  return config


def exact_match(model, frozen, trainable, batch):
  generate = jax.jit(lambda t, f, b: e2llm.generate(model, f, t, b, DIGITS + 1, passkey.EOS))
  tokens = np.asarray(generate(trainable, frozen, batch))
  want = batch["target_ids"][:, :DIGITS]
  return float(np.mean(np.all(tokens[:, :DIGITS] == want, axis=1)))


def test_passkey_retrieval_is_learned_through_the_soft_tokens():
  config = passkey_config()
  setup = state_lib.create_train_state(config, sharding.make_mesh((1, 1, 1), config.mesh.axes))
  data = loop.make_data(config, setup.model)
  first = loop._model_arrays(data.local_batch(0))
  train_step = step_lib.make_train_step(config, setup, first).lower(
      setup.state, setup.frozen, first).compile(compiler_options=FULL_OPTIMIZATION)
  state = setup.state
  start = time.monotonic()
  for step in range(STEPS):
    state, _ = train_step(state, setup.frozen, loop._model_arrays(data.local_batch(step)))
  seconds = time.monotonic() - start
  held_out = loop._model_arrays(data.held_out_batch(0, HELD_OUT))
  accuracy = exact_match(setup.model, setup.frozen, state["trainable"], held_out)
  silenced = jax.tree.map(jnp.zeros_like, state["trainable"]["adapter"]["fc2"])
  no_soft = {**state["trainable"], "adapter": {**state["trainable"]["adapter"], "fc2": silenced}}
  chance = exact_match(setup.model, setup.frozen, no_soft, held_out)
  print(f"passkey exact match {accuracy:.3f} after {STEPS} steps ({seconds:.0f} s); "
        f"soft tokens zeroed {chance:.3f}")
  assert accuracy >= 0.95
  assert chance <= 0.02  # 4 random digits: chance is 1e-4
