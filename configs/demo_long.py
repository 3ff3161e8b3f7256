"""The recipe behind artifacts/demo: MiniLM-L6 + SmolLM2-135M-Instruct taught to read RULER needles.

Two stages on a 2-core CPU (see artifacts/demo/README.md for the measured curves and scores):
  python train.py --config=configs/demo_long.py:stage=1 --workdir=W1
  python train.py --config=configs/demo_long.py:stage=2 --workdir=W2 --config.train.init_from=W1
Stage 1 reads short contexts (8 chunks) and mostly restates needle-dense chunks, so every example
carries digits to copy; stage 2 starts from its parameters and answers over 4x more chunks.
"""

from e2llm_jax import config_utils
from configs import demo


def get_config(arg=None):
  stage = config_utils.parse_config_arg(arg, stage=1).stage
  if stage not in (1, 2):
    raise ValueError(f"configs/demo_long.py: stage must be 1 or 2, got {stage}.")
  c = demo.get_config()
  c.model.tokens_per_chunk = 8  # 32-token chunks -> 4x compression
  c.data.chunk_tokens = 32
  c.data.prefix_tokens = 56
  c.data.query_tokens = 56
  c.data.target_tokens = 48  # answers, and one 32-token chunk restated (<= 45 decoder tokens)
  c.data.ruler_samples = 4000  # fresh needles: the run never sees one twice in its budget
  # Needle-dense text to restate (RULER's haystack of needles), plus essays and SQuAD paragraphs.
  c.data.recon_sources = ("niah_multikey_2", "niah_single_2", "qa_1")
  c.loss.recon_warmup_steps = 0
  c.optim.warmup_steps = 20
  c.train.eval_every = 100
  c.train.eval_examples = 24  # 8 per RULER task, at the training length
  c.ckpt.every_steps = 50
  c.ckpt.keep = 100  # bench/learning_curve.py scores every saved step at the evaluation lengths
  if stage == 1:
    c.data.max_chunks = 8
    c.data.tasks = {"niah_single_1": 0.2, "niah_single_2": 0.15, "qa_1": 0.15, "recon": 0.5}
    c.loss.recon_weight = 1.0
    c.train.steps = 400
  else:
    c.data.max_chunks = 32
    c.data.tasks = {"niah_single_1": 0.3, "niah_single_2": 0.3, "qa_1": 0.2, "recon": 0.2}
    c.loss.recon_weight = 0.5
    c.train.steps = 250
  return c
