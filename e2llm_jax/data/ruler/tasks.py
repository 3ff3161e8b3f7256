"""The drafts of RULER's task families: NIAH, VT (variable tracking), CWE, FWE and QA.

A draft builds a sample's prompt for any haystack size; `generation` sizes it to the token budget.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import string
import uuid
from typing import Any, Sequence

from e2llm_jax.data.ruler.fitting import Draft, Measured, Prompt, TokenCounter, UnitSearch, fill_template
from e2llm_jax.data.ruler.spec import (CWE_ANSWER_PREFIX, CWE_NUM_COMMON, CWE_SHORT_CONTEXT, CWE_TEMPLATE,
                                       DEPTHS, FWE_ANSWER_PREFIX, FWE_CODED_WORD_LETTERS, FWE_NOISE_WORD,
                                       FWE_TEMPLATE, FWE_TOKENS_PER_VOCAB_WORD, FWE_ZETA_OF_ALPHA,
                                       FWE_ZIPF_ALPHA, NIAH_NEEDLE, NOISE_SENTENCE, QA_ANSWER_PREFIX,
                                       QA_DOCUMENT, QA_TEMPLATE, QA_TOP_UP_CANDIDATES, VT_ANSWER_PREFIX,
                                       VT_ICL_MAX_LENGTH, VT_ICL_NAME_LETTERS, VT_ICL_VALUE,
                                       VT_NAME_LETTERS, VT_NUM_HOPS, VT_TEMPLATE, TaskSpec)
from e2llm_jax.data.ruler.texts import (QaCorpus, QaQuestion, essay_layout, essay_vocabulary, essay_words,
                                        group_is_eval, qa_corpus, wonderwords_list)


def _rng(*parts: Any) -> random.Random:
  """A private random stream named by its parts, so each sample is reproducible on its own."""
  return random.Random("/".join(str(part) for part in parts))


# ----------------------------------------------------------------------------------------------------------
# NIAH.

def _random_value(rng: random.Random, kind: str) -> str:
  if kind == "numbers":
    return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
  if kind == "words":
    # Uniform over adjective-noun pairs, as RULER's choice from the sorted product (built lazily: 6M strings).
    return f"{rng.choice(wonderwords_list('adjective'))}-{rng.choice(wonderwords_list('noun'))}"
  if kind == "uuids":
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  raise ValueError(f"Unknown needle type {kind!r}; choose 'numbers', 'words' or 'uuids'.")


def niah_draft(spec: TaskSpec, task: str, seed: int, index: int) -> tuple[Draft, dict[str, Any]]:
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

  def render(context: str) -> Prompt:
    return fill_template(template, prefix, context, answers, type_needle_v=type_needle_v, query=query)

  def between_lines(lines: list[str], units: int) -> str:
    positions = sorted(_rng(*placement).sample(range(units), len(needles)), reverse=True)
    for position, needle in zip(positions, needles):
      lines.insert(position, needle)
    return "\n".join(lines)

  extra = {"answer": answers[0]}
  if spec.haystack == "noise":
    draft = Draft(lambda units: render(between_lines([NOISE_SENTENCE] * units, units)),
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

    draft = Draft(lambda units: render(between_lines(distractor_lines(units), units)),
                  min_units=len(needles), probe_units=25)
  elif spec.haystack == "essay":

    def essay_context(units: int) -> str:
      base = len(essay_words())
      words, starts = essay_layout(-(-units // base))
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

    draft = Draft(lambda units: render(essay_context(units)), min_units=1, probe_units=500)
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


def _vt_render(names: Sequence[str], value: str, context: str, preamble: str = "") -> Prompt:
  prefix = VT_ANSWER_PREFIX.format(num_v=len(names), query=value)
  return fill_template(VT_TEMPLATE, prefix, context, names, preamble=preamble, query=value)


@dataclasses.dataclass(frozen=True)
class VtExample:
  """RULER's one-shot example: sized once to VT_ICL_MAX_LENGTH tokens, names and value redrawn per sample."""
  noise_lines: int
  seed_parts: tuple[Any, ...]

  def text(self, names: Sequence[str], value: str) -> str:
    prompt = _vt_render(names, value, _vt_context(names, value, self.noise_lines, _rng(*self.seed_parts)))
    return prompt.input + prompt.answer_prefix + " " + " ".join(names) + "\n"


def make_vt_example(counter: TokenCounter, task: str, seed: int) -> VtExample:
  names = _variable_names(_rng(seed, task, "icl"), VT_NUM_HOPS + 1, VT_ICL_NAME_LETTERS)
  seed_parts = (seed, task, "icl", "placement")

  def build(units: int) -> Prompt:
    return _vt_render(names, VT_ICL_VALUE, _vt_context(names, VT_ICL_VALUE, units, _rng(*seed_parts)))

  search = UnitSearch(counter, VT_ICL_MAX_LENGTH, task, VT_ICL_MAX_LENGTH)  # no tokens to generate here
  units, _, _ = search.fit(Draft(build, min_units=VT_NUM_HOPS + 1, probe_units=5))
  return VtExample(units, seed_parts)


def vt_draft(task: str, seed: int, index: int, example: VtExample) -> tuple[Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  names = _variable_names(rng, VT_NUM_HOPS + 1, VT_NAME_LETTERS)
  value = str(rng.randrange(10000, 99999))
  example_names = _variable_names(rng, VT_NUM_HOPS + 1, VT_ICL_NAME_LETTERS)
  preamble = example.text(example_names, str(rng.randrange(10000, 99999))) + "\n"
  placement = (seed, task, index, "placement")

  def build(units: int) -> Prompt:
    return _vt_render(names, value, _vt_context(names, value, units, _rng(*placement)), preamble=preamble)

  return Draft(build, min_units=VT_NUM_HOPS + 1, probe_units=25), {}


# ----------------------------------------------------------------------------------------------------------
# CWE: common words.

@dataclasses.dataclass(frozen=True)
class CwePools:
  words: tuple[str, ...]  # wonderwords nouns + adjectives + verbs, sorted, distinct, shuffled with the seed
  more_words: tuple[str, ...]  # the same plus the essays' vocabulary, for contexts that need more words


def make_cwe_pools(seed: int) -> CwePools:
  words = sorted(set(wonderwords_list("noun") + wonderwords_list("adjective") + wonderwords_list("verb")))
  random.Random(seed).shuffle(words)
  more_words = sorted(set(words) | set(essay_vocabulary()))
  random.Random(seed).shuffle(more_words)
  return CwePools(tuple(words), tuple(more_words))


def _numbered(words: Sequence[str]) -> str:
  return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(seed: int, words: Sequence[str], common_repeats: int, uncommon_repeats: int) -> str:
  common, uncommon = list(words[:CWE_NUM_COMMON]), list(words[CWE_NUM_COMMON:])
  word_list = common * common_repeats + uncommon * uncommon_repeats
  random.Random(seed).shuffle(word_list)  # RULER shuffles with the fixed seed
  return _numbered(word_list)


def cwe_draft(task: str, seed: int, index: int, max_seq_length: int,
              pools: CwePools) -> tuple[Draft, dict[str, Any]]:
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

  def build(units: int) -> Prompt:
    if units <= len(order):
      words = order[:units]
    else:  # RULER switches to a larger word pool when a context needs more words than wonderwords has
      if not more_order:
        more_rng = _rng(seed, task, index, "more_words")
        more_order.extend(more_rng.sample(pools.more_words, len(pools.more_words)))
      words = more_order[:units]
    return fill_template(CWE_TEMPLATE, CWE_ANSWER_PREFIX, _cwe_list(seed, words, *repeats), words[:CWE_NUM_COMMON],
                         preamble=example + "\n")

  return Draft(build, min_units=CWE_NUM_COMMON + 1, max_units=len(pools.more_words), probe_units=100), {}


# ----------------------------------------------------------------------------------------------------------
# FWE: frequent (coded) words.

def fwe_draft(task: str, seed: int, index: int, max_seq_length: int) -> tuple[Draft, dict[str, Any]]:
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

  def build(units: int) -> Prompt:
    words = []
    for rank, word in enumerate(vocab, start=1):
      words += [word] * int(units * rank ** -FWE_ZIPF_ALPHA / FWE_ZETA_OF_ALPHA)
    random.Random(seed).shuffle(words)
    return fill_template(FWE_TEMPLATE, FWE_ANSWER_PREFIX, " ".join(words), vocab[1:4])

  # Below ~100 words the 3rd and 4th real words can tie; more words keep the gold answer unambiguous.
  return Draft(build, min_units=100, probe_units=1000), {}


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
class QaShared:
  corpus: QaCorpus
  pool: list[QaQuestion]  # this split's questions in this seed's order
  document_tokens: dict[int, int]  # token counts of documents, filled on demand


def make_qa_shared(dataset: str, task: str, seed: int, question_pool: str) -> QaShared:
  corpus = qa_corpus(dataset)
  want_eval = question_pool == "eval"
  pool = [q for q in corpus.questions if group_is_eval(dataset, q.group) == want_eval]
  _rng(seed, task, "questions").shuffle(pool)
  return QaShared(corpus, pool, {})


def qa_draft(task: str, seed: int, index: int, question: QaQuestion, shared: QaShared,
             counter: TokenCounter, budget: int) -> tuple[Draft, dict[str, Any]]:
  rng = _rng(seed, task, index)
  documents = shared.corpus.documents
  related = list(question.related)
  rng.shuffle(related)
  # Gold paragraphs first, then the question's own other paragraphs, then random ones: the first n of this
  # order are the n documents (RULER's rule, made prefix-stable so that more units never drop a document).
  order = list(question.gold) + related
  random_docs = _DistinctDraws(rng, len(documents), order)

  def build_from(ids: Sequence[int]) -> Prompt:
    ids = list(ids)
    random.Random(seed).shuffle(ids)  # RULER shuffles the documents with the fixed seed
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=documents[d]) for i, d in enumerate(ids))
    return fill_template(QA_TEMPLATE, QA_ANSWER_PREFIX, context, question.answers, query=question.question)

  def chosen(units: int) -> list[int]:
    return order[:units] + random_docs.first(units - len(order))

  def document_tokens(document: int) -> int:
    if document not in shared.document_tokens:
      shared.document_tokens[document] = counter.count(
          "\n\n" + QA_DOCUMENT.format(i=len(documents), document=documents[document]))
    return shared.document_tokens[document]

  def top_up(units: int, prompt: Prompt, measured: Measured) -> tuple[Prompt, Measured]:
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

  draft = Draft(lambda units: build_from(chosen(units)), min_units=len(question.gold),
                max_units=len(order) + random_docs.available, probe_units=10, top_up=top_up)
  return draft, {}
