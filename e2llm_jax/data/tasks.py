"""Training examples: instruction (answer from all chunks) and reconstruction (restate a chunk window).

Owns every prompt template, the decoder chat-template split, and the fixed-shape ids and masks.

Decoder sequence, built by the model from one example (all blocks fixed-size; `k` = soft tokens per chunk):

    prefix_ids [P] ‖ soft tokens [N·k] ‖ query_ids [Q] ‖ target_ids [A]
    (left-pad)       (chunk_mask)        (left-pad)      (right-pad)

- `prefix` is the text before the context: the chat template's opening (system turn and the start of the
  user turn) and the template's text before `{context}`; left-padded, so it ends right before the soft
  tokens. Without a chat template it starts with the tokenizer's own leading special tokens (BOS).
- the soft tokens of chunk `i` are slots `[i·k, (i+1)·k)`; a padded chunk (`chunk_mask == 0`) gives k
  masked slots.
- `query` is the template's text after `{context}` (with the question) and the chat template's end of the
  user turn and start of the assistant turn; left-padded, so the prompt ends at slot `P + N·k + Q - 1`
  and the first target token (or the first generated token) always sits at slot `P + N·k + Q`.
- `target` is the answer (instruction) or the window's text (reconstruction) followed by the decoder's
  EOS, right-padded. A target longer than `A` keeps its first `A` tokens and no EOS (so the model is never
  taught to stop mid-text). The loss is a cross entropy over `target_mask` tokens: the logits at the slot
  before each target token predict it.
Padding never shifts a position: the model counts positions as the cumulative sum of the mask.

Arrays of one example (all int32): `chunk_ids [N,T]`, `chunk_token_mask [N,T]`, `chunk_mask [N]` (encoder
side), `prefix_ids/prefix_mask [P]`, `query_ids/query_mask [Q]`, `target_ids/target_mask [A]` (decoder
side), and scalars `task` (TASK_INSTRUCTION or TASK_RECONSTRUCTION), `chunks_dropped` (over-long policy),
`prompt_tokens_dropped` and `target_tokens_dropped` (middle-truncated prompt text, cut target).

Chat templates: rendering a template around the soft tokens is impossible (they are not text), so the
template is rendered once with a sentinel string as the user's message and split at the sentinel into an
opening and a closing text; the prompt template's own text goes inside the user turn, and the soft tokens
go between its prefix and its query. This assumes the template copies the message text verbatim
(every common Llama/Mistral/Qwen/ChatML template does; one that trims content trims only the sentinel).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping

import numpy as np

from e2llm_jax.data import chunking

TASK_INSTRUCTION = 0
TASK_RECONSTRUCTION = 1
CHAT_SENTINEL = "\u2063E2LLM_USER_MESSAGE\u2063"
TEMPLATE_FIELDS = ("context", "question")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """`text` holds `{context}` once (where the soft tokens go) and optionally `{question}`."""
  text: str
  answer: str = "{answer}"  # how the target is written, e.g. the format a benchmark's scorer parses


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "qa": PromptTemplate(
        "Answer the question using the text below. Give only the answer.\n\nText:\n{context}\n\n"
        "Question: {question}\nAnswer:"),
    "plain": PromptTemplate("{context}\n\n{question}"),
    "question_first": PromptTemplate("{question}\n\nText:\n{context}\n\nQuestion: {question}\nAnswer:"),
    "multiple_choice": PromptTemplate(
        "Read the text below and answer the question.\n\nText:\n{context}\n\n{question}\n\n"
        "Reply in the form \"The correct answer is (X)\" with X one of A, B, C, D.",
        answer="The correct answer is ({answer})."),
    "summary": PromptTemplate("Summarize the text below.\n\nText:\n{context}\n\n{question}\nSummary:"),
    # Reconstruction ("understanding"): the paper's "restate the context" task.
    "recon": PromptTemplate("{context}\n\nRestate the text above word for word."),
}


def resolve_template(template: str | PromptTemplate) -> PromptTemplate:
  """A template by name from PROMPT_TEMPLATES, or a literal format string with one `{context}`."""
  if isinstance(template, PromptTemplate):
    found = template
  elif template in PROMPT_TEMPLATES:
    found = PROMPT_TEMPLATES[template]
  elif "{context}" in template:
    found = PromptTemplate(template)
  else:
    raise ValueError(f"unknown prompt template {template!r}: use one of {sorted(PROMPT_TEMPLATES)} or "
                     "a format string with one '{context}' and optionally '{question}'.")
  fields = [name for _, name, _, _ in string.Formatter().parse(found.text) if name is not None]
  unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
  if fields.count("context") != 1 or unknown:
    raise ValueError(f"prompt template {found.text!r} must hold '{{context}}' exactly once and no fields "
                     f"but {TEMPLATE_FIELDS} (found {fields}); write a literal brace as '{{{{'.")
  return found


def split_template(template: PromptTemplate, question: str) -> tuple[str, str]:
  """The template's text before and after `{context}`, with the question filled in."""
  marker = "\x00"
  rendered = template.text.format(context=marker, question=question.replace(marker, ""))
  prefix, query = rendered.split(marker)
  return prefix, query


def chat_wrappers(tokenizer: Any, system_prompt: str | None = None) -> tuple[str, str]:
  """The chat template's text before and after one user message (generation prompt included)."""
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": CHAT_SENTINEL})
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  if rendered.count(CHAT_SENTINEL) != 1:
    raise ValueError("the decoder's chat template does not copy the user message verbatim; set "
                     "data.chat_template=False to use plain text prompts.")
  opening, closing = rendered.split(CHAT_SENTINEL)
  return opening, closing


@dataclasses.dataclass(frozen=True)
class ExampleSizes:
  """Static sizes of one example (from `config.data`)."""
  chunk_tokens: int   # T: encoder ids per chunk, special tokens included
  max_chunks: int     # N
  prefix_tokens: int  # P
  query_tokens: int   # Q
  target_tokens: int  # A
  recon_window: int   # chunks per reconstruction example (≤ N)

  @classmethod
  def from_config(cls, data_config: Any) -> ExampleSizes:
    return cls(**{field.name: int(data_config[field.name]) for field in dataclasses.fields(cls)})

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) < 1:
        raise ValueError(f"data.{field.name} must be positive, got {getattr(self, field.name)}.")
    if self.recon_window > self.max_chunks:
      raise ValueError(f"data.recon_window={self.recon_window} exceeds data.max_chunks="
                       f"{self.max_chunks}; lower it.")


def _fit(head: list[int], body: list[int], tail: list[int], limit: int, what: str
         ) -> tuple[list[int], int]:
  """head + body + tail within `limit` ids; the body loses its middle when it must."""
  room = limit - len(head) - len(tail)
  if room < 0:
    raise ValueError(f"the fixed {what} text (chat template and prompt template) takes "
                     f"{len(head) + len(tail)} decoder tokens > data.{what}_tokens={limit}; raise it.")
  if len(body) <= room:
    return head + body + tail, 0
  keep_front = room - room // 2
  kept = body[:keep_front] + (body[len(body) - room // 2:] if room // 2 else [])
  return head + kept + tail, len(body) - room


def _pad(ids: list[int], length: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((length,), pad_id, np.int32)
  mask = np.zeros((length,), np.int32)
  if ids:
    where = slice(length - len(ids), length) if left else slice(0, len(ids))
    out[where] = ids
    mask[where] = 1
  return out, mask


class ExampleEncoder:
  """Turns `{context, question, answer}` or a context into one fixed-shape example (see module doc)."""

  def __init__(self, encoder_tokenizer: Any, decoder_tokenizer: Any, sizes: ExampleSizes, *,
               chunk_overlap: int = 0, split_digits: bool = False,
               overlong_policy: str = "head_tail",
               chat_template: bool | None = None,
               system_prompt: str | None = None):
    self.sizes = sizes
    self.overlong_policy = overlong_policy
    chunking.kept_chunk_indices(0, sizes.max_chunks, overlong_policy)  # validates the name early
    self.chunker = chunking.Chunker(encoder_tokenizer, sizes.chunk_tokens, chunk_overlap,
                                    split_digits)
    self.encoder_pad_id = int(encoder_tokenizer.pad_token_id or 0)
    self.decoder_tokenizer = decoder_tokenizer
    if decoder_tokenizer.eos_token_id is None:
      raise ValueError("the decoder tokenizer has no EOS token, so targets cannot end; use a decoder "
                       "tokenizer that defines eos_token.")
    self.eos_id = int(decoder_tokenizer.eos_token_id)
    pad = decoder_tokenizer.pad_token_id
    self.decoder_pad_id = int(self.eos_id if pad is None else pad)
    has_template = bool(getattr(decoder_tokenizer, "chat_template", None))
    if chat_template and not has_template:
      raise ValueError("data.chat_template=True but the decoder tokenizer has no chat template.")
    self.uses_chat_template = has_template if chat_template is None else bool(chat_template)
    if self.uses_chat_template:
      self.chat_opening, self.chat_closing = chat_wrappers(decoder_tokenizer, system_prompt)
      self.leading_ids: list[int] = []  # the chat template writes its own BOS when it wants one
    else:
      self.chat_opening, self.chat_closing = "", ""
      self.leading_ids = chunking.special_token_wrappers(decoder_tokenizer)[0]
    self._token_cache: dict[str, list[int]] = {}

  def decoder_tokens(self, text: str, cache: bool = False) -> list[int]:
    """Decoder ids of `text`, no special tokens added (special-token text in it is recognised)."""
    if cache and text in self._token_cache:
      return self._token_cache[text]
    backend = getattr(self.decoder_tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None:
      ids = list(backend.encode(text, add_special_tokens=False).ids)
    else:
      ids = list(self.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])
    if cache and len(self._token_cache) < 4096:  # prompt openings repeat; questions do not
      self._token_cache[text] = ids
    return ids

  def decoder_arrays(self, prefix_text: str, query_text: str, target_text: str
                     ) -> dict[str, np.ndarray]:
    """prefix/query/target ids and masks for prompt texts placed around the soft tokens."""
    sizes = self.sizes
    prefix = self.decoder_tokens(self.chat_opening + prefix_text, cache=True)
    prefix_dropped = 0
    if len(self.leading_ids) + len(prefix) > sizes.prefix_tokens:
      prefix, prefix_dropped = _fit(self.leading_ids + self.decoder_tokens(self.chat_opening, True),
                                    self.decoder_tokens(prefix_text), [], sizes.prefix_tokens, "prefix")
    else:
      prefix = self.leading_ids + prefix
    query = self.decoder_tokens(query_text + self.chat_closing)
    query_dropped = 0
    if len(query) > sizes.query_tokens:
      query, query_dropped = _fit([], self.decoder_tokens(query_text),
                                  self.decoder_tokens(self.chat_closing, True), sizes.query_tokens,
                                  "query")
    target = self.decoder_tokens(target_text) + [self.eos_id]
    target_dropped = max(len(target) - sizes.target_tokens, 0)
    target = target[:sizes.target_tokens]
    arrays = {}
    arrays["prefix_ids"], arrays["prefix_mask"] = _pad(prefix, sizes.prefix_tokens,
                                                       self.decoder_pad_id, left=True)
    arrays["query_ids"], arrays["query_mask"] = _pad(query, sizes.query_tokens, self.decoder_pad_id,
                                                     left=True)
    arrays["target_ids"], arrays["target_mask"] = _pad(target, sizes.target_tokens,
                                                       self.decoder_pad_id, left=False)
    arrays["prompt_tokens_dropped"] = np.int32(prefix_dropped + query_dropped)
    arrays["target_tokens_dropped"] = np.int32(target_dropped)
    return arrays

  def chunk_arrays(self, chunks: chunking.Chunks) -> dict[str, np.ndarray]:
    padded = chunking.pad_chunks(chunks, self.sizes.max_chunks, self.sizes.chunk_tokens,
                                 self.encoder_pad_id, self.overlong_policy)
    return {"chunk_ids": padded.ids, "chunk_token_mask": padded.token_mask,
            "chunk_mask": padded.chunk_mask, "chunks_dropped": np.int32(padded.num_dropped)}

  def instruction(self, context: str, question: str, answer: str,
                  template: str | PromptTemplate = "qa") -> dict[str, np.ndarray]:
    """Answer `question` from the soft tokens of all of `context`'s chunks."""
    found = resolve_template(template)
    prefix_text, query_text = split_template(found, question)
    example = self.chunk_arrays(self.chunker(context))
    example.update(self.decoder_arrays(prefix_text, query_text, found.answer.format(answer=answer)))
    example["task"] = np.int32(TASK_INSTRUCTION)
    return example

  def reconstruction(self, context: str, rng: np.random.Generator | None = None,
                     template: str | PromptTemplate = "recon",
                     window_start: int | None = None) -> dict[str, np.ndarray]:
    """Restate the text of `recon_window` consecutive chunks from their soft tokens only.

    The window starts at `window_start`, else at a chunk drawn with `rng`, else at the first chunk.
    """
    found = resolve_template(template)
    chunks = self.chunker(context)
    window = min(self.sizes.recon_window, len(chunks))
    if window_start is None:
      window_start = int(rng.integers(0, len(chunks) - window + 1)) if rng is not None else 0
    if not 0 <= window_start <= len(chunks) - window:
      raise ValueError(f"window_start={window_start} outside [0, {len(chunks) - window}] for a context "
                       f"of {len(chunks)} chunks.")
    selected = chunks.select(range(window_start, window_start + window))
    # The window's text: its first chunk whole (overlap included: it is in that chunk's soft token).
    target_text = context[selected.spans[0][0]:selected.spans[-1][1]].strip()
    prefix_text, query_text = split_template(found, "")
    example = self.chunk_arrays(selected)
    example.update(self.decoder_arrays(prefix_text, query_text,
                                       found.answer.format(answer=target_text)))
    example["task"] = np.int32(TASK_RECONSTRUCTION)
    return example


def example_shapes(sizes: ExampleSizes) -> Mapping[str, tuple[int, ...]]:
  """The shape of every array of one example (all int32)."""
  return {
      "chunk_ids": (sizes.max_chunks, sizes.chunk_tokens),
      "chunk_token_mask": (sizes.max_chunks, sizes.chunk_tokens),
      "chunk_mask": (sizes.max_chunks,),
      "chunks_dropped": (),
      "prefix_ids": (sizes.prefix_tokens,), "prefix_mask": (sizes.prefix_tokens,),
      "query_ids": (sizes.query_tokens,), "query_mask": (sizes.query_tokens,),
      "target_ids": (sizes.target_tokens,), "target_mask": (sizes.target_tokens,),
      "prompt_tokens_dropped": (), "target_tokens_dropped": (), "task": (),
  }
