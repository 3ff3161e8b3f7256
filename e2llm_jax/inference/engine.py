"""The inference engine: a trained E2LLM that compresses contexts once and answers questions on device.

Built from a workdir (config.json + a checkpoint) or in-memory state; shapes are bucketed, so a bucket compiles once.
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2llm_jax import errors, sharding
from e2llm_jax.data import chunking, pipeline, tasks
from e2llm_jax.inference import decoding, loading
from e2llm_jax.inference.soft_context import SoftContext
from e2llm_jax.models import bert, e2llm

MAX_CHUNKS_PER_CALL = 1024  # chunks one encoder call holds (bounds its activations)
MAX_TEXTS_PER_CALL = 256    # texts one embed_texts call holds
# Smallest buckets: fewer, larger shapes compile fewer times; padding at these sizes costs little.
MIN_PROMPT_BUCKET = 128       # a prompt of text only
MIN_SOFT_BUCKET = 64
MIN_PROMPT_TEXT_BUCKET = 64   # the text beside soft tokens (most questions fit one bucket)
MIN_CHUNK_BUCKET = 32
MIN_NEW_TOKENS_BUCKET = 16
MIN_TEXT_BUCKET = 16


def _encode_chunks(model: e2llm.E2LLMConfig, frozen, trainable, ids, mask):
  """Soft tokens [M,k,D] of M chunks [M,T] (each chunk alone, so chunks shard over the batch)."""
  return e2llm.soft_tokens(model, frozen, trainable, ids[:, None, :], mask[:, None, :]).astype(
      jnp.float32)


def _embed_texts(model: e2llm.E2LLMConfig, frozen, trainable, ids, mask):
  """L2-normalised mean of the encoder's (LoRA) last hidden states over real tokens, [B,De]."""
  mean = lambda hidden, mask: bert.Pooling("mean", model.encoder.hidden_size).apply(
      {"params": {}}, hidden.astype(jnp.float32), mask)
  pooled = bert.encode(model.encoder, frozen["encoder"], ids, mask,
                       lora=e2llm.scaled_lora(trainable, "encoder_lora", model.encoder_lora),
                       pool=mean)[:, 0]
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class E2LLM:
  """A trained E2LLM for inference; build it with `from_workdir` or `from_state`.

  Text methods (`compress`, `generate*`, `chunk`, `embed_texts`) need both tokenizers; runs on
  random towers without tokenizers (the passkey task) use `generate_arrays`. `last_timings` holds
  the seconds of the latest call's stages (`compress_s`, `prefill_s`, `decode_s`) and `new_tokens`.
  `frozen` holds the towers as the jitted calls take them (`e2llm.frozen_at_rest`).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: e2llm.E2LLMConfig, frozen: Any,
               trainable: Any, encoder_tokenizer: Any = None, decoder_tokenizer: Any = None,
               mesh: jax.sharding.Mesh | None = None, step: int | None = None):
    self.config = config
    self.model = model
    # Taken by every jitted call as it is: a CPU's bf16 kernels packed once here, not per call.
    self.frozen = e2llm.frozen_at_rest(frozen)
    self.trainable = trainable  # the setter, which also drops params merged from an older tree
    self.step = step
    if mesh is None:
      mesh = sharding.mesh_of(frozen)
    self.mesh = mesh if mesh is not None else loading.default_mesh(config)
    batch_axes = dict(sharding.normalize_rules(config.mesh.rules)).get("batch", ())
    self.batch_multiple = math.prod(self.mesh.shape[a] for a in batch_axes if a in self.mesh.shape)
    self.encoder_tokenizer = encoder_tokenizer
    self.decoder_tokenizer = decoder_tokenizer
    self.examples = None
    if encoder_tokenizer is not None and decoder_tokenizer is not None:
      window = self.decoder_window
      # Prompts are never cut to the training sizes; only the decoder's window bounds them.
      sizes = tasks.ExampleSizes(chunk_tokens=int(config.data.chunk_tokens),
                                 max_chunks=int(config.data.max_chunks), prefix_tokens=window,
                                 query_tokens=window, target_tokens=1, recon_window=1)
      self.examples = pipeline.make_example_encoder(config, encoder_tokenizer, decoder_tokenizer,
                                                    sizes)
    self.last_timings: dict[str, float] = {}
    self._encode = jax.jit(functools.partial(_encode_chunks, model))
    self._embed = jax.jit(functools.partial(_embed_texts, model))
    self._prefill = jax.jit(functools.partial(decoding.prefill, model),
                            static_argnames=("cache_length",))
    self._decode = jax.jit(functools.partial(decoding.decode, model), static_argnames=("max_new",))

  @property
  def trainable(self) -> Any:
    return self._trainable

  @trainable.setter
  def trainable(self, value: Any) -> None:
    self._trainable, self._served = value, None

  def _served_params(self) -> tuple[Any, Any]:
    """(frozen, trainable) the jitted calls take: with `inference.merge_lora`, float32 towers with
    their LoRA merged in (`e2llm.merge_lora`), once per trainable tree."""
    if self._served is None:
      self._served = (e2llm.merge_lora(self.model, self.frozen, self._trainable)
                      if self.config.inference.merge_lora
                      else (self.frozen, self._trainable))
    return self._served

  # -- Construction. -------------------------------------------------------------------------------

  @classmethod
  def from_state(cls, config: ml_collections.ConfigDict, model: e2llm.E2LLMConfig, frozen: Any,
                 trainable: Any, encoder_tokenizer: Any = None, decoder_tokenizer: Any = None,
                 mesh: jax.sharding.Mesh | None = None) -> E2LLM:
    """An engine over arrays already in memory (e.g. the training loop's state, no copy).

    `mesh` defaults to the mesh the frozen weights live on.
    """
    return cls(config, model, frozen, trainable, encoder_tokenizer, decoder_tokenizer, mesh)

  @classmethod
  def from_workdir(cls, workdir: str | pathlib.Path, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> E2LLM:
    """The run in `workdir` (config.json, checkpoint `step`, newest by default); see
    `loading.load_workdir`. `mesh`: all devices on fsdp."""
    return cls(*loading.load_workdir(workdir, step, mesh))

  @classmethod
  def from_export(cls, export_dir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                  encoder_path: str | pathlib.Path | None = None,
                  decoder_path: str | pathlib.Path | None = None) -> E2LLM:
    """A full or adapters-only export (`python -m e2llm_jax.hf.export`); an adapters-only one
    finds its base towers at `*_path`, else where the export recorded them (fingerprint-checked)."""
    return cls(*loading.load_export(export_dir, mesh, encoder_path, decoder_path))

  # -- Text helpers. -------------------------------------------------------------------------------

  @property
  def decoder_window(self) -> int:
    """The decoder's maximum positions: prompt plus new tokens must fit."""
    return int(self.model.decoder.max_position_embeddings)

  def _text_ready(self, what: str) -> tasks.ExampleEncoder:
    if self.examples is None:
      raise errors.UserError(f"{what} needs the encoder and decoder tokenizers, which this engine "
                             "lacks (random-init towers have none); use generate_arrays on ids.")
    return self.examples

  def chunk(self, text: str) -> list[str]:
    """The chunk texts the run's chunker cuts `text` into."""
    return self._text_ready("chunk").chunker(text).texts

  def template_for(self, task: str, record: Mapping[str, Any]) -> str | tasks.PromptTemplate:
    """The template training used for `task`'s decoded `record` (`builders.decode_record`):
    `data.templates[task]`, else the record's own preamble (RULER), else `qa`."""
    templates = dict(self.config.data.get("templates", None) or {})
    return templates[task] if task in templates else pipeline.record_template(record)

  # -- Compression. --------------------------------------------------------------------------------

  def compress(self, texts: str | Sequence[str]) -> SoftContext | list[SoftContext]:
    """Soft tokens of every chunk of each text (any number of chunks; one encoder pass)."""
    examples = self._text_ready("compress")
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    start = time.perf_counter()
    all_chunks = [examples.chunker(text) for text in texts]
    soft, slots = self._soft_tokens_of([ids for chunks in all_chunks for ids in chunks.ids])
    contexts, first = [], 0
    for text, chunks in zip(texts, all_chunks):
      count = len(chunks)
      contexts.append(SoftContext(
          soft_tokens=soft[first:first + count].reshape(count * self.model.tokens_per_chunk, -1),
          slot_mask=slots[first:first + count].reshape(-1),
          chunk_mask=np.ones((count,), np.int32), chunk_texts=list(chunks.texts),
          chunk_spans=list(chunks.spans), num_context_tokens=len(examples.decoder_tokens(text)),
          tokens_per_chunk=self.model.tokens_per_chunk))
      first += count
    self.last_timings = {"compress_s": time.perf_counter() - start}
    return contexts[0] if single else contexts

  def _soft_tokens_of(self, chunk_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[M, k, D] float32 soft tokens of M chunks (encoder ids with special tokens), and [M, k]
    int32: 1 at those the decoder reads (`e2llm.soft_token_mask`)."""
    tokens = int(self.config.data.chunk_tokens)
    pad_id = int(getattr(self.encoder_tokenizer, "pad_token_id", None) or 0)
    out, slots, first = [], [], 0
    for count, rows in decoding.bucketed_calls(len(chunk_ids), MIN_CHUNK_BUCKET,
                                               MAX_CHUNKS_PER_CALL, self.batch_multiple):
      part, first = chunk_ids[first:first + count], first + count
      padded = chunking.pad_chunks(part, rows, tokens, pad_id)
      soft = self._encode(*self._served_params(), self._batch(padded.ids),
                          self._batch(padded.token_mask))
      out.append(_host(soft)[:len(part)])
      visible = e2llm.soft_token_mask(self.model, np.ones((len(part), 1), np.int32),
                                      np.asarray(padded.token_mask[:len(part), None]))
      slots.append(visible.reshape(len(part), self.model.tokens_per_chunk))
    if not out:
      return (np.zeros((0, self.model.tokens_per_chunk, self.model.decoder.hidden_size), np.float32),
              np.zeros((0, self.model.tokens_per_chunk), np.int32))
    return np.concatenate(out), np.concatenate(slots)

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """[n, De]: the encoder's mean-pooled last hidden states (LoRA on), L2-normalised (for RAG)."""
    self._text_ready("embed_texts")
    limit = int(self.model.encoder.max_position_embeddings)
    pad_id = int(getattr(self.encoder_tokenizer, "pad_token_id", None) or 0)
    out = []
    for first in range(0, len(texts), MAX_TEXTS_PER_CALL):
      part = list(texts[first:first + MAX_TEXTS_PER_CALL])
      encoded = self.encoder_tokenizer(part, add_special_tokens=True, truncation=True,
                                       max_length=limit)["input_ids"]
      width = min(decoding.bucket(max(len(ids) for ids in encoded), MIN_TEXT_BUCKET), limit)
      rows = decoding.bucket(len(part), multiple=self.batch_multiple)
      padded = chunking.pad_chunks(encoded, rows, width, pad_id)
      pooled = self._embed(*self._served_params(), self._batch(padded.ids),
                           self._batch(padded.token_mask))
      out.append(_host(pooled)[:len(part)])
    return np.concatenate(out) if out else np.zeros((0, self.model.encoder.hidden_size), np.float32)

  # -- Generation. ---------------------------------------------------------------------------------

  def generate(self, question: str, context: str | SoftContext, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               stop: Sequence[str] | None = None,
               template: str | tasks.PromptTemplate | None = None) -> str:
    """The answer to `question` about `context` (text, compressed here, or a SoftContext)."""
    return self.generate_batch([question], [context], max_new_tokens, temperature, top_p, top_k,
                               seed, stop, template)[0]

  def generate_batch(self, questions: Sequence[str], contexts: Sequence[str | SoftContext],
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, seed: int = 0, stop: Sequence[str] | None = None,
                     template: str | tasks.PromptTemplate | Sequence | None = None) -> list[str]:
    """Answers for rows of (question, context), decoded together.

    The prompt is the run's instruction prompt: `template` (a name of `tasks.PROMPT_TEMPLATES`, a
    literal with `{context}`, a PromptTemplate, or one per row; default `qa`, see `template_for`)
    with the context's soft tokens in place of `{context}`, inside the decoder's chat template.
    """
    examples = self._text_ready("generate")
    if len(questions) != len(contexts):
      raise errors.UserError(f"{len(questions)} questions but {len(contexts)} contexts; pass one "
                             "context per question.")
    templates = list(template) if isinstance(template, (list, tuple)) else [template] * len(
        questions)
    texts = [i for i, context in enumerate(contexts) if isinstance(context, str)]
    contexts = list(contexts)
    compress_s = 0.0
    if texts:
      for index, soft in zip(texts, self.compress([contexts[i] for i in texts])):
        contexts[index] = soft
      compress_s = self.last_timings["compress_s"]
    rows = []
    for question, context, row_template in zip(questions, contexts, templates):
      found = tasks.resolve_template(row_template or pipeline.INSTRUCTION_TEMPLATE)
      prefix_text, query_text = tasks.split_template(found, question)
      arrays = examples.decoder_arrays(prefix_text, query_text, "")
      rows.append(decoding.PromptRow(_real(arrays["prefix_ids"], arrays["prefix_mask"]),
                                     context.visible_soft_tokens,
                                     _real(arrays["query_ids"], arrays["query_mask"])))
    texts_out = self._generate_text_rows(rows, max_new_tokens, temperature, top_p, top_k, seed,
                                         stop)
    self.last_timings["compress_s"] = compress_s
    return texts_out

  def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 64,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                    stop: Sequence[str] | None = None) -> list[str]:
    """Plain decoder continuations of text prompts inside the decoder's chat template (no soft
    tokens): the `full`, `none` and `rag` baselines on the same decoder."""
    examples = self._text_ready("generate_text")
    rows = []
    for prompt in prompts:
      arrays = examples.decoder_arrays(prompt, "", "")
      rows.append(decoding.PromptRow(_real(arrays["prefix_ids"], arrays["prefix_mask"]) +
                                     _real(arrays["query_ids"], arrays["query_mask"]), None, []))
    texts = self._generate_text_rows(rows, max_new_tokens, temperature, top_p, top_k, seed, stop)
    self.last_timings["compress_s"] = 0.0
    return texts

  def generate_arrays(self, batch: Mapping[str, np.ndarray], max_new_tokens: int,
                      eos_token_id: int | None = None, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """New ids [B, max_new_tokens] for a batch in the model's layout (`e2llm.BATCH_KEYS`: chunk,
    prefix and query ids and masks); slots after an EOS hold EOS, as `e2llm.generate` gives."""
    chunk_ids = np.asarray(batch["chunk_ids"])
    size, num_chunks, _ = chunk_ids.shape
    flat = chunk_ids.reshape(size * num_chunks, -1)
    flat_mask = np.asarray(batch["chunk_token_mask"]).reshape(size * num_chunks, -1)
    soft, _ = self._soft_tokens_of([list(ids[m == 1]) for ids, m in zip(flat, flat_mask)])
    soft = soft.reshape(size, num_chunks * self.model.tokens_per_chunk, -1)
    soft_mask = e2llm.soft_token_mask(self.model, np.asarray(batch["chunk_mask"]),
                                      np.asarray(batch["chunk_token_mask"]))
    rows = [decoding.PromptRow(_real(batch["prefix_ids"][b], batch["prefix_mask"][b]),
                               soft[b][soft_mask[b] == 1],
                               _real(batch["query_ids"][b], batch["query_mask"][b]))
            for b in range(size)]
    eos = self.model.decoder.eos_token_id if eos_token_id is None else eos_token_id
    pad = 0 if eos is None else int(eos)
    tokens = self._run(rows, max_new_tokens, temperature, top_p, top_k, seed,
                       [] if eos is None else [int(eos)], [], pad)
    return tokens[:, :max_new_tokens]

  def _generate_text_rows(self, rows, max_new_tokens, temperature, top_p, top_k, seed, stop):
    examples = self.examples
    stop = [s for s in (stop or []) if s]
    stop_ids = [examples.decoder_tokens(s) for s in stop]
    tokens = self._run(rows, max_new_tokens, temperature, top_p, top_k, seed, [examples.eos_id],
                       stop_ids, examples.decoder_pad_id)
    texts = []
    for row in tokens[:, :max_new_tokens].tolist():
      row = row[:row.index(examples.eos_id)] if examples.eos_id in row else row
      text = self.decoder_tokenizer.decode(row, skip_special_tokens=True)
      cuts = [text.find(s) for s in stop if s in text]
      texts.append(text[:min(cuts)] if cuts else text)
    return texts

  def _run(self, rows: list[decoding.PromptRow], max_new_tokens: int, temperature: float,
           top_p: float, top_k: int, seed: int, eos_ids: list[int], stop_ids: list[list[int]],
           pad_id: int) -> np.ndarray:
    """Prefill and decode `rows` in one bucket; new ids [len(rows), new-token bucket]."""
    if not rows:
      return np.zeros((0, max_new_tokens), np.int32)
    if max_new_tokens < 1:
      raise errors.UserError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if any(row.length == 0 for row in rows):
      raise errors.UserError("a prompt has no tokens at all; give it a question or a context.")
    longest = max(row.length for row in rows)
    if longest + max_new_tokens > self.decoder_window:
      raise errors.PromptTooLongError(
          f"a prompt of {longest} decoder tokens (soft tokens included) plus max_new_tokens="
          f"{max_new_tokens} exceeds the decoder's window of {self.decoder_window} positions; "
          "shorten the context or the question, or lower max_new_tokens.")
    new = decoding.bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    size = decoding.bucket(len(rows), multiple=self.batch_multiple)
    most_soft = max(row.num_soft for row in rows)
    soft_slots = decoding.bucket(most_soft, MIN_SOFT_BUCKET) if most_soft else 1
    length = decoding.bucket(longest, MIN_PROMPT_BUCKET)
    if most_soft:
      # The prefill runs the decoder over every slot. A prompt of 252 soft tokens and 27 text ones
      # bucketed whole fills 512 slots; the soft bucket (a compiled shape already) plus the text's
      # own bucket fills 320. Whichever is smaller.
      text = max(row.length - row.num_soft for row in rows)
      length = min(length, soft_slots + decoding.bucket(text, MIN_PROMPT_TEXT_BUCKET))
    ids, soft_index, mask, soft = decoding.prompt_arrays(rows, size, length, soft_slots,
                                                         self.model.decoder.hidden_size)
    begin = time.perf_counter()
    logits, cache = self._prefill(*self._served_params(), self._batch(ids), self._batch(soft),
                                  self._batch(soft_index), self._batch(mask),
                                  cache_length=length + new)
    logits = jax.block_until_ready(logits)
    prefilled = time.perf_counter()
    eos_table = decoding.id_table([[i] for i in eos_ids], decoding.MAX_EOS_IDS, 1, "EOS ids")[:, 0]
    stop_table = decoding.id_table(stop_ids, decoding.MAX_STOP_SEQUENCES,
                                   decoding.MAX_STOP_TOKENS, "stop sequences")
    tokens, steps = self._decode(
        *self._served_params(), cache, logits, np.int32(max_new_tokens),
        np.float32(temperature), np.int32(top_k), np.float32(top_p),
        np.uint32(int(seed) & 0xFFFFFFFF), eos_table, stop_table, np.int32(pad_id), max_new=new)
    tokens = _host(tokens)[:len(rows)]
    self.last_timings = {"prefill_s": prefilled - begin,
                         "decode_s": time.perf_counter() - prefilled,
                         "new_tokens": float(jax.device_get(steps))}
    return tokens

  def _batch(self, array: np.ndarray) -> jax.Array:
    """`array` placed with its leading axis over the mesh's batch axes."""
    return jax.device_put(array, sharding.batch_sharding(self.mesh, self.config.mesh.rules,
                                                         array.ndim))


def _host(array: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (gathered when other processes hold some rows)."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _real(ids: np.ndarray, mask: np.ndarray) -> list[int]:
  return [int(i) for i in np.asarray(ids)[np.asarray(mask) == 1]]

