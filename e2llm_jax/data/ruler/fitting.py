"""Fitting a haystack to the token budget: tokens counted as RULER counts them, and the search for the size.

Owns the rendered prompt (`Prompt`, `fill_template`), a sample's `Draft`, `TokenCounter` and `UnitSearch`.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Sequence

# ----------------------------------------------------------------------------------------------------------
# Token counting.

@dataclasses.dataclass
class Measured:
  length: int  # tokens without special tokens
  encoding: Any = None  # a `tokenizers.Encoding` when the tokenizer has a Rust backend (gives char offsets)


class TokenCounter:
  """Counts a text's tokens like RULER's `text_to_tokens` (no BOS/EOS/CLS) with any HF tokenizer."""

  def __init__(self, tokenizer: Any):
    self._tokenizer = tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.split(".")[0] == "tokenizers":
      backend = tokenizer
    if backend is not None:
      # The Rust backend directly: fastest, gives offsets, and skips the wrapper's "longer than the model's
      # maximum length" warning, which does not apply to counting. A private copy, because a backend can carry
      # truncation and padding (MiniLM's tokenizer.json pads and truncates to 128) that counting must not see.
      backend = type(backend).from_str(backend.to_str())
      backend.no_truncation()
      backend.no_padding()
    self._backend = backend
    if backend is None and not (hasattr(tokenizer, "encode") or callable(tokenizer)):
      raise TypeError(f"Tokenizer {type(tokenizer).__name__} has neither `encode` nor `__call__`; pass a "
                      "Hugging Face tokenizer (e.g. from e2llm_jax.hf.load_tokenizer).")

  def measure(self, text: str) -> Measured:
    if self._backend is not None:
      encoding = self._backend.encode(text, add_special_tokens=False)
      return Measured(len(encoding.ids), encoding)
    if hasattr(self._tokenizer, "encode"):
      return Measured(len(self._tokenizer.encode(text, add_special_tokens=False)))
    return Measured(len(self._tokenizer(text, add_special_tokens=False)["input_ids"]))

  def count(self, text: str) -> int:
    return self.measure(text).length

  def token_position(self, text: str, measured: Measured, char_index: int) -> int:
    """How many tokens come before character `char_index` of `text` (RULER's token_position_answer)."""
    if measured.encoding is not None:
      token = measured.encoding.char_to_token(char_index)
      if token is not None:
        return token
      starts = [start for start, _ in measured.encoding.offsets]
      return bisect.bisect_left(starts, char_index)
    return self.count(text[:char_index])


# ----------------------------------------------------------------------------------------------------------
# Fitting a haystack to the token budget.

@dataclasses.dataclass(frozen=True)
class Prompt:
  input: str
  answer_prefix: str
  outputs: tuple[str, ...]
  context_start: int  # input[context_start:context_end] is the template's {context} slot
  context_end: int


def fill_template(template: str, answer_prefix: str, context: str, outputs: Sequence[str], preamble: str = "",
                  **fields: Any) -> Prompt:
  """Fills a template whose `{context}` appears once, remembering where the context landed."""
  marker = "\x00CONTEXT\x00"
  filled = template.format(context=marker, **fields)
  head, tail = filled.split(marker)
  head = preamble + head
  return Prompt(head + context + tail, answer_prefix, tuple(outputs), len(head), len(head) + len(context))


@dataclasses.dataclass
class Draft:
  """One sample before its size is known: `build(units)` gives the prompt with that many haystack units."""
  build: Callable[[int], Prompt]
  min_units: int
  max_units: int | None = None
  probe_units: int = 10  # a small size to measure tokens per unit on the first sample
  # Called with the best fit as (units, prompt, measured); may add material that still fits.
  top_up: Callable[[int, Prompt, Measured], tuple[Prompt, Measured]] | None = None


class UnitSearch:
  """Finds per sample the most haystack units whose prompt fits the token budget (RULER's binary search).

  Full tokenizations are what cost at 128k, so the search jumps to where the token count should meet the
  budget: from the average tokens per unit (two small probes on the first sample, then the last fit) while no
  size is known to overflow, then by interpolating between the sizes known to fit and to overflow (every
  third step a bisection, so it never crawls). It warm-starts from the previous sample and stops once the
  unused budget is below GAP_TOLERANCE of it: a 128k sample takes a few tokenizations, not one per bisection.
  """

  GAP_TOLERANCE = 0.002
  MAX_GROWTH = 16  # a jump multiplies the haystack by at most this, so a bad estimate cannot explode memory

  def __init__(self, counter: TokenCounter, budget: int, task: str, max_seq_length: int):
    self.counter, self.budget = counter, budget
    self.task, self.max_seq_length = task, max_seq_length
    self.last_units: int | None = None
    self.tokens_per_unit: float | None = None

  def fit(self, draft: Draft) -> tuple[int, Prompt, Measured]:
    cache: dict[int, tuple[Prompt, Measured]] = {}

    def length(units: int) -> int:
      if units not in cache:
        prompt = draft.build(units)
        cache[units] = (prompt, self.counter.measure(prompt.input + prompt.answer_prefix))
      return cache[units][1].length

    smallest = lo = draft.min_units
    hi: int | None = None
    if length(lo) > self.budget:
      raise ValueError(
          f"RULER task {self.task!r} cannot fit max_seq_length={self.max_seq_length}: its smallest prompt "
          f"({lo} haystack units) already has {length(lo)} tokens and the budget is {self.budget} tokens "
          f"(after {self.max_seq_length - self.budget} tokens to generate). Use a larger max_seq_length.")

    def jump_from(units: int) -> float:
      gap_units = (self.budget - length(units)) / (self.tokens_per_unit or 1.0)
      return min(units + max(1.0, gap_units), self.MAX_GROWTH * units + draft.probe_units)

    if self.last_units is None or self.tokens_per_unit is None:
      probe = lo + draft.probe_units
      if draft.max_units is not None:
        probe = min(probe, draft.max_units)
      if probe > lo:
        self.tokens_per_unit = max((length(probe) - length(lo)) / (probe - lo), 1e-3)
        if length(probe) <= self.budget:
          lo = probe
        else:
          hi = probe
      guess = jump_from(lo)
    else:
      guess = self.last_units
    tolerance = max(1, int(self.budget * self.GAP_TOLERANCE))
    step = 0
    while True:
      top = hi - 1 if hi is not None else draft.max_units
      if (top is not None and lo >= top) or (lo > smallest and self.budget - length(lo) < tolerance):
        break
      units = max(lo + 1, int(guess))
      if top is not None:
        units = min(units, top)
      if length(units) <= self.budget:
        lo = units
      else:
        hi = units
      step += 1
      if hi is None:
        guess = jump_from(lo)
      elif step % 3 == 0:
        guess = (lo + hi) / 2
      else:
        guess = lo + (self.budget - length(lo)) * (hi - lo) / max(length(hi) - length(lo), 1)
    if lo > smallest:  # the average over the whole haystack: steadier than any local slope
      self.tokens_per_unit = max((length(lo) - length(smallest)) / (lo - smallest), 1e-3)
    self.last_units = lo
    prompt, measured = cache[lo]
    if draft.top_up is not None:
      prompt, measured = draft.top_up(lo, prompt, measured)
    return lo, prompt, measured
