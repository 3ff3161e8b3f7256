"""Tiny random towers on the synthetic passkey task: a full training run in seconds on CPU.

Used by tests and smoke runs; nothing comes from disk, so the random base weights are saved.
"""

from e2llm_jax import config_utils


def get_config(arg=None):
  del arg  # no variants
  c = config_utils.base_config()
  # A vocabulary of 8192 makes each embedding 2 MiB, big enough that sharding tests see real
  # splits; everything else stays tiny.
  c.model.encoder.random_init = config_utils.random_tower(
      vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
  c.model.decoder.random_init = config_utils.random_tower(
      vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
      num_kv_heads=2)  # grouped-query attention, as in Llama/Qwen, so tests cover it
  c.model.pooling = "pma"
  c.model.tokens_per_chunk = 2
  c.model.pma_heads = 2
  c.model.adapter_hidden = 64

  c.lora.encoder_rank = 4
  c.lora.decoder_rank = 4
  c.lora.encoder_alpha = 8.0
  c.lora.decoder_alpha = 8.0

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2

  c.train.steps = 20
  c.train.batch_size = 8  # divisible by the 8 fake CPU devices of the tests (mesh (1, 8, 1))
  c.train.log_every = 5
  c.train.eval_examples = 8

  c.data.tasks = {"passkey": 0.7, "recon": 0.3}  # both losses in every run
  c.data.chunk_tokens = 16
  c.data.max_chunks = 4
  c.data.recon_window = 2
  c.data.prefix_tokens = 8
  c.data.query_tokens = 16
  c.data.target_tokens = 32  # a reconstruction target is recon_window x chunk_tokens
  c.data.passkey.value_digits = 3

  c.mesh.shape = (1, -1, 1)
  c.ckpt.every_steps = 10
  c.ckpt.keep = 2
  return c
