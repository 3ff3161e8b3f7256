"""Benchmark: does a chunk's content cross the soft tokens? Per checkpoint of a run, reconstruction
NLL of digit and other tokens on fresh chunks, the soft tokens' scale and spread, and an oracle.

`python bench/channel_probe.py --workdir=W [--steps=100,200] [--examples=16]`
Chunks come from the run's own reconstruction sources at a pipeline step it never trains. The
oracle puts the decoder's own embeddings of each chunk's text in the soft slots: a perfect channel.
Ends with `channel_digit_nll=<newest probed step's digit NLL>`; chance for a digit is ln 10 = 2.30.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import learning_curve

from e2llm_jax import checkpoint
from e2llm_jax.data import pipeline
from e2llm_jax.inference import loading
from e2llm_jax.models import e2llm, llama

PROBE_STEP = 10**7  # a pipeline step no run reaches: chunks the run never restated


def recon_batch(loaded: loading.LoadedModel, examples: int) -> dict[str, np.ndarray]:
  """Reconstruction examples from the run's recon sources (its other tasks when none are named)."""
  config = loaded.config.copy_and_resolve_references()
  tasks = dict(config.data.tasks)
  sources = tuple(config.data.recon_sources) or tuple(n for n in tasks if n != pipeline.RECON)
  config.data.tasks = {pipeline.RECON: 1.0}
  config.data.recon_sources = sources
  config.train.batch_size = examples
  made = pipeline.make_pipeline(config, loaded.encoder_tokenizer, loaded.decoder_tokenizer,
                                process_index=0, process_count=1)
  return made.local_batch(PROBE_STEP)


def teacher_forced(model: e2llm.E2LLMConfig, frozen: Any, trainable: Any, batch: dict, **soft: Any
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per target token NLL [B,A] and the greedy choice at each target position [B,A]."""
  logits = e2llm.target_logits(model, frozen, trainable,
                               {k: jnp.asarray(v) for k, v in batch.items()}, **soft)
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  nll = -np.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
  return nll, log_probs.argmax(-1)


def digit_tokens(tokenizer: Any, ids: np.ndarray) -> np.ndarray:
  """Which ids decode to digits only (SmolLM2 writes one token per digit)."""
  is_digit = {int(i): tokenizer.decode([int(i)]).strip().isdigit() for i in np.unique(ids)}
  return np.vectorize(is_digit.__getitem__)(ids)


def by_kind(nll: np.ndarray, greedy: np.ndarray, batch: dict, digits: np.ndarray) -> dict:
  """Mean NLL and greedy accuracy over the real target tokens that are digits, and the others."""
  real, correct = batch["target_mask"].astype(bool), greedy == batch["target_ids"]
  out = {}
  for kind, chosen in (("digit", real & digits), ("other", real & ~digits)):
    count = int(chosen.sum())
    out[f"{kind}_nll"] = float(nll[chosen].mean()) if count else math.nan
    out[f"{kind}_accuracy"] = float(correct[chosen].mean()) if count else math.nan
  return out


def soft_tokens(loaded: loading.LoadedModel, trainable: Any, batch: dict) -> jax.Array:
  """The soft tokens [B,N·k,D] of the batch's chunks, as the training loss computes them."""
  return e2llm.soft_tokens(loaded.model, loaded.frozen, trainable, jnp.asarray(batch["chunk_ids"]),
                           jnp.asarray(batch["chunk_token_mask"]), grouped=False)


def word_norm(loaded: loading.LoadedModel) -> float:
  """Mean norm of the decoder's word embeddings (the scale its own inputs have)."""
  words = llama.embed(loaded.model.decoder, loaded.frozen["decoder"],
                      jnp.arange(loaded.model.decoder.vocab_size)[None])[0]
  return float(np.linalg.norm(np.asarray(words, np.float32), axis=-1).mean())


def soft_spread(soft: jax.Array, tokens_per_chunk: int) -> dict:
  """The soft tokens' mean norm, and their spread across chunks and across a chunk's slots (as
  shares of that norm), over each example's first chunk."""
  first = np.asarray(soft, np.float32)[:, :tokens_per_chunk]
  norm = float(np.linalg.norm(first, axis=-1).mean())
  spread = lambda axis: float(
      np.linalg.norm(first - first.mean(axis, keepdims=True), axis=-1).mean())
  return {"soft_norm": norm, "across_chunks": spread(0) / norm, "across_slots": spread(1) / norm}


def oracle(loaded: loading.LoadedModel, batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """`teacher_forced` when the soft slots hold the decoder's embeddings of the target text itself
  (end-of-turn token dropped) and the decoder has no LoRA: what the untrained decoder copies."""
  texts = [ids[mask.astype(bool)][:-1]
           for ids, mask in zip(batch["target_ids"], batch["target_mask"])]
  width = max(len(t) for t in texts)
  ids, mask = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), np.int32)
  for row, text in enumerate(texts):
    ids[row, :len(text)], mask[row, :len(text)] = text, 1
  model = dataclasses.replace(loaded.model, tokens_per_chunk=width)
  soft = llama.embed(model.decoder, loaded.frozen["decoder"], jnp.asarray(ids))
  return teacher_forced(model, loaded.frozen, {}, batch, soft=soft, soft_mask=jnp.asarray(mask))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", default="", help="comma-separated checkpoint steps; default all")
  parser.add_argument("--examples", type=int, default=16)
  parser.add_argument("--show", type=int, default=3, help="restatements printed per step")
  args = parser.parse_args()

  loaded = loading.load_workdir(args.workdir)
  batch = recon_batch(loaded, args.examples)
  real = batch["target_mask"].astype(bool)
  digits = digit_tokens(loaded.decoder_tokenizer, batch["target_ids"])
  rows = [("oracle: the text's own embeddings", by_kind(*oracle(loaded, batch), batch, digits))]
  words = word_norm(loaded)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          loaded.trainable)
  checkpoints = pathlib.Path(args.workdir) / loading.CHECKPOINTS_DIR
  learning_curve.wait_for_saves(checkpoints)  # opening a reader removes an unfinished save
  with checkpoint.Checkpointer(checkpoints, 1, 1 << 30, async_save=False) as reader:
    for step in [int(s) for s in args.steps.split(",") if s] or sorted(reader.all_steps()):
      trainable, _, _ = reader.restore_params(step, abstract)
      soft = soft_tokens(loaded, trainable, batch)  # encoded once: the NLL and the spread share it
      nll, greedy = teacher_forced(loaded.model, loaded.frozen, trainable, batch, soft=soft)
      rows.append((f"step {step}", {**by_kind(nll, greedy, batch, digits),
                                    **soft_spread(soft, loaded.model.tokens_per_chunk),
                                    "word_norm": words}))
      for row in range(min(args.show, len(real))):
        for what, ids in (("gold", batch["target_ids"][row]), ("said", greedy[row])):
          print(f"step {step} {what}: {loaded.decoder_tokenizer.decode(ids[real[row]].tolist())!r}")

  keys = ("digit_nll", "digit_accuracy", "other_nll", "other_accuracy", "soft_norm",
          "across_chunks", "across_slots", "word_norm")
  print("| | " + " | ".join(keys) + " |")
  print("|---" * (len(keys) + 1) + "|")
  for name, values in rows:
    print(f"| {name} | " + " | ".join(
        f"{values[k]:.3f}" if k in values else "" for k in keys) + " |")
  print(f"channel_digit_nll={rows[-1][1]['digit_nll']:.4f}")


if __name__ == "__main__":
  main()
