"""The recipe behind artifacts/demo: MiniLM-L6 + SmolLM2-135M-Instruct taught to read RULER contexts.

Every text token of a chunk is a soft token (pooling `tokens`, digits split for the encoder), and the
adapter starts from a least-squares fit of encoder token states to the decoder's embeddings
(train.adapter_warm_start); see artifacts/demo/README.md for every variant tried and the scores.
  python train.py --config=configs/demo_long.py:stage=1 --workdir=W1   # restate single chunks
  python train.py --config=configs/demo_long.py:stage=2 --workdir=W2 --config.train.init_from=W1
  python train.py --config=configs/demo_long.py:stage=3 --workdir=W3 --config.train.init_from=W2
Stage 1 restates one chunk at a time (cheap steps, dense signal on every token); stage 2 answers
RULER questions over short contexts of 8 chunks, with some restating kept; stage 3 answers over
contexts five times longer, where essays and SQuAD paragraphs fill the haystack. `init_from`
also takes an adapters-only export (e.g. artifacts/demo, stage 2's) in place of a run folder.
"""

from e2llm_jax import config_utils
from configs import demo


def get_config(arg=None):
  stage = config_utils.parse_config_arg(arg, stage=1).stage
  if stage not in (1, 2, 3):
    raise ValueError(f"configs/demo_long.py: stage must be 1, 2 or 3, got {stage}.")
  c = demo.get_config()
  c.model.pooling = "tokens"
  c.data.chunk_tokens = 64
  c.model.tokens_per_chunk = 64  # pooling `tokens`: one slot per encoder position
  c.data.encoder_split_digits = True  # one MiniLM token per digit, as SmolLM2 writes numbers
  c.model.adapter_hidden = 768  # 2 x MiniLM's width: room for the warm start's exact linear map
  c.train.adapter_warm_start = 512  # chunk texts the least-squares fit reads
  c.data.prefix_tokens = 56
  c.data.query_tokens = 56
  c.data.target_tokens = 72  # answers, and one 64-token chunk restated
  c.data.ruler_samples = 2000
  # RULER's needle haystacks, essays and SQuAD paragraphs to restate.
  c.data.recon_sources = ("niah_multikey_2", "niah_single_2", "qa_1")
  c.loss.recon_warmup_steps = 0
  c.optim.lr = 3e-4
  c.optim.adapter_lr = 3e-4
  c.optim.warmup_steps = 5
  c.train.batch_size = 16
  c.train.eval_every = 0
  c.ckpt.every_steps = 10
  c.ckpt.keep = 100  # bench/learning_curve.py and bench/channel_probe.py read every saved step
  if stage == 1:
    c.data.prefix_tokens = 24  # the restating prompt is short
    c.data.query_tokens = 24
    c.data.max_chunks = 1
    c.data.ruler_max_seq_length = 512
    c.data.tasks = {"recon": 1.0}
    c.loss.recon_weight = 1.0
    c.train.steps = 40
    c.train.eval_examples = 0  # reconstruction only: bench/channel_probe.py measures it
  elif stage == 2:
    c.data.max_chunks = 8
    c.data.tasks = {"niah_single_1": 0.3, "niah_single_2": 0.3, "qa_1": 0.2, "recon": 0.2}
    c.loss.recon_weight = 0.5
    c.train.batch_size = 8
    c.train.steps = 40
    c.train.eval_examples = 0  # scored on the export by the showcase at 4k and 8k (model card)
  else:
    c.data.max_chunks = 40
    c.data.tasks = {"niah_single_2": 0.4, "qa_1": 0.35, "niah_single_1": 0.1, "recon": 0.15}
    c.loss.recon_weight = 0.5
    c.optim.lr = 2e-4
    c.optim.adapter_lr = 2e-4
    c.optim.warmup_steps = 2
    c.data.ruler_samples = 200  # per task: more than 20 steps of 8 draw, each 5x as long to build
    c.train.batch_size = 8
    c.train.microbatches = 4  # attention over ~2.6k positions: a quarter of the batch at once
    c.train.steps = 20  # artifacts/demo is its step 10, where the 2-hour training budget ended
    c.train.eval_examples = 0
    c.ckpt.every_steps = 5
  return c
