"""RULER's task table: the prompt text of RULER main, and one `TaskSpec` per task name.

Owns `TASKS` (the 13 tasks), each task's generator family and tokens to generate, and the generators' knobs.
"""

from __future__ import annotations

import dataclasses
import math

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
