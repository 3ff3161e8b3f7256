"""Tests of the RULER generators (e2llm_jax.data.ruler): every task follows BENCHMARKS.md §B.1.

Lengths are counted with the MiniLM tokenizer (fast, offline); gold answers are re-derived from the text.
"""

import collections
import json
import pathlib
import re
import subprocess
import sys

import pytest
import transformers

from e2llm_jax import assets
from e2llm_jax.data import ruler
from e2llm_jax.data.ruler import texts as ruler_texts

NUM_SAMPLES = 3
LENGTHS = (1024, 4096)
SEED = 42
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: (\d{7}|" + UUID + r")\.")


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())


_CACHE = {}


@pytest.fixture(scope="module")
def samples(tokenizer):
  def get(task, length, seed=SEED, num_samples=NUM_SAMPLES):
    key = (task, length, seed, num_samples)
    if key not in _CACHE:
      _CACHE[key] = ruler.generate(task, length, num_samples, seed, tokenizer)
    return _CACHE[key]
  return get


def token_count(tokenizer, text):
  return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_of(sample):
  return sample["input"][sample["context_start"]:sample["context_end"]]


def lower_bound(task, length):
  # One niah_multikey_3 haystack unit (a line with two uuids) is ~60 MiniLM tokens, 6% of 1k: at 1k the best
  # whole number of lines can leave more than 5% unused. Every other task fills 95% at every length.
  return 0.90 if (task, length) == ("niah_multikey_3", 1024) else 0.95


# ----------------------------------------------------------------------------------------------------------
# Every task: lengths, fields, determinism.

@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_length_fills_the_budget_in_decoder_tokens(task, length, samples, tokenizer):
  for index, sample in enumerate(samples(task, length)):
    assert sample["index"] == index
    assert {"input", "outputs", "length", "answer_prefix", "length_w_model_temp"} <= set(sample)
    counted = token_count(tokenizer, sample["input"] + sample["answer_prefix"])
    assert sample["length"] == counted + ruler.TOKENS_TO_GENERATE[task]
    assert lower_bound(task, length) * length <= sample["length"] <= length, sample["length"]
    assert sample["outputs"] and all(isinstance(o, str) and o for o in sample["outputs"])
    assert context_of(sample) and sample["context_end"] <= len(sample["input"])
    json.dumps(sample)  # jsonl-ready


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_same_seed_same_samples_other_seed_other_samples(task, tokenizer, samples):
  first = samples(task, 1024, seed=7, num_samples=2)
  assert ruler.generate(task, 1024, 2, 7, tokenizer) == first
  other = samples(task, 1024, seed=8, num_samples=2)
  assert [s["input"] for s in other] != [s["input"] for s in first]
  assert first[0]["input"] != first[1]["input"]  # samples differ within a run too


def test_tokens_to_generate_match_ruler():
  assert ruler.TOKENS_TO_GENERATE == {
      **{task: 128 for task in ruler.TASKS if task.startswith("niah")},
      "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}


def test_long_context_32k(tokenizer):
  for task in ("niah_single_2", "qa_2"):
    (sample,) = ruler.generate(task, 32768, 1, SEED, tokenizer)
    assert 0.95 * 32768 <= sample["length"] <= 32768
    counted = token_count(tokenizer, sample["input"] + sample["answer_prefix"])
    assert sample["length"] == counted + ruler.TOKENS_TO_GENERATE[task]
    if task == "niah_single_2":
      assert f": {sample['outputs'][0]}." in context_of(sample)


def test_errors_name_the_problem(tokenizer):
  with pytest.raises(ValueError, match="Unknown RULER task 'niah'"):
    ruler.generate("niah", 4096, 1, 0, tokenizer)
  with pytest.raises(ValueError, match="leaves no room"):
    ruler.generate("niah_single_1", 100, 1, 0, tokenizer)
  with pytest.raises(ValueError, match="cannot fit max_seq_length=300"):
    ruler.generate("cwe", 300, 1, 0, tokenizer)
  with pytest.raises(ValueError, match="question_pool"):
    ruler.generate("qa_1", 4096, 1, 0, tokenizer, question_pool="test")


# ----------------------------------------------------------------------------------------------------------
# NIAH.

NIAH_TASKS = [task for task, spec in ruler.TASKS.items() if spec.family == "niah"]


def parse_needles(text):
  found = collections.defaultdict(list)
  for kind, key, value in NEEDLE.findall(text):
    found[key].append(value)
  return found


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_follows_the_spec(task, length, samples, tokenizer):
  spec = ruler.TASKS[task]
  value_kind = spec.value_type  # "numbers" or "uuids"
  singular = spec.num_queries * spec.num_values == 1
  shown_kind = value_kind[:-1] if singular else value_kind
  for sample in samples(task, length):
    text, context = sample["input"], context_of(sample)
    if singular:
      assert text.startswith(f"A special magic {shown_kind} is hidden within the following text. Make sure "
                             f"to memorize it. I will quiz you about the {shown_kind} afterwards.\n")
      question = re.search(rf"\nWhat is the special magic {shown_kind} for (.+) mentioned in the provided "
                           r"text\?$", text)
    else:
      assert text.startswith(f"Some special magic {shown_kind} are hidden within the following text. Make "
                             f"sure to memorize it. I will quiz you about the {shown_kind} afterwards.\n")
      question = re.search(rf"\nWhat are all the special magic {shown_kind} for (.+) mentioned in the "
                           r"provided text\?$", text)
    assert question, text[-300:]
    query = question.group(1)
    verb = "is" if singular else "are"
    assert sample["answer_prefix"] == (
        f" The special magic {shown_kind} for {query} mentioned in the provided text {verb}")
    keys = query.replace(", and ", ", ").split(", ") if spec.num_queries > 1 else [query]
    assert len(keys) == spec.num_queries

    needles = parse_needles(context)
    # Every needle names the plural type, whatever the question's grammar.
    assert all(kind == value_kind for kind, _, _ in NEEDLE.findall(context))
    gold = [value for key in keys for value in needles[key]]
    assert sorted(gold) == sorted(sample["outputs"])
    assert len(sample["outputs"]) == spec.num_queries * spec.num_values
    for key in keys:
      if spec.key_type == "uuids":
        assert re.fullmatch(UUID, key)
      else:
        assert re.fullmatch(r"[^-]+(?:-[^-]+)+", key)  # adjective-noun (either may hold a hyphen or space)
    value_pattern = UUID if value_kind == "uuids" else r"\d{7}"
    assert all(re.fullmatch(value_pattern, value) for value in sample["outputs"])

    if spec.haystack == "needle":
      lines = context.split("\n")
      assert all(NEEDLE.fullmatch(line) for line in lines)
      assert len(lines) > 5 and len(needles[keys[0]]) == 1  # distractors never answer the question
    else:
      assert sum(len(values) for values in needles.values()) == spec.num_keys * spec.num_values
      assert len(needles) == spec.num_keys
      if spec.haystack == "noise":
        assert {line for line in context.split("\n") if not NEEDLE.fullmatch(line)} == {ruler.NOISE_SENTENCE}
      else:  # essay: the first words of the essays, in order
        words = NEEDLE.sub("", context).split()
        assert words == list(ruler_texts.essay_words()[:len(words)])

    answer_at = text.find(sample["outputs"][0])
    assert abs(sample["token_position_answer"] - token_count(tokenizer, text[:answer_at])) <= 2


def test_niah_essay_needles_sit_at_sentence_boundaries(samples):
  for sample in samples("niah_multikey_1", 4096):
    context = context_of(sample)
    for match in NEEDLE.finditer(context):
      if not context[match.end():].strip():
        continue  # depth 100: after the last, cut-off sentence
      before = context[:match.start()].rstrip()
      assert before == "" or re.search(r"[.!?][\"')\]\u201d\u2019]*$", before), before[-80:]


def test_sentence_splitter():
  text = ('Mr. Smith went to  Washington. He left! Did he? "Yes." Then J. R. R. Tolkien wrote it, e.g. '
          'This. 3 cats.')
  assert ruler.split_sentences(text) == [
      "Mr. Smith went to Washington.", "He left!", "Did he?", '"Yes."',
      "Then J. R. R. Tolkien wrote it, e.g. This.", "3 cats."]


# ----------------------------------------------------------------------------------------------------------
# VT.

def resolve_chain(context, value):
  assignments = {}
  for line in context.split("\n"):
    match = re.fullmatch(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+) ?", line)
    if match:
      assignments[match.group(1)] = match.group(2)
    else:
      assert line == ruler.NOISE_SENTENCE, line

  def value_of(name, seen=()):
    right = assignments[name]
    return right if right.isdigit() else value_of(right[4:], seen + (name,))

  return {name for name in assignments if value_of(name) == value}


@pytest.mark.parametrize("length", LENGTHS)
def test_vt_follows_the_chain(length, samples):
  for sample in samples("vt", length):
    text, context = sample["input"], context_of(sample)
    question = re.search(r"\nQuestion: Find all variables that are assigned the value (\d{5}) in the text "
                         r"above\.$", text)
    assert question
    value = question.group(1)
    assert sample["answer_prefix"] == (
        " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
        f"assigned the value {value}, they are: ")
    assert all(re.fullmatch(r"[A-Z]{5}", name) for name in sample["outputs"])
    assert len(set(sample["outputs"])) == 5
    assert resolve_chain(context, value) == set(sample["outputs"])
    # The chain runs in order: each line assigns the variable named on the line before.
    chain = [line for line in context.split("\n") if line.startswith("VAR ")]
    assert chain[0] == f"VAR {sample['outputs'][0]} = {value}"

    # The one-shot example comes first: the same template, answered, with 3-letter names.
    head = text[:sample["context_start"]]
    example, task_header = head.rsplit("\n\n", 2)[0], head.rsplit("\n\n", 2)[1:]
    assert text.startswith("Memorize and track the chain(s) of variable assignment hidden in the following "
                           "text.\n\n")
    assert task_header[0].startswith("Memorize and track")
    answered = re.search(r"assigned the value (\d{5}), they are:  ([A-Z]{3}(?: [A-Z]{3}){4})$", example)
    assert answered, example[-200:]
    example_context = example.split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    assert resolve_chain(example_context, answered.group(1)) == set(answered.group(2).split())


def test_vt_example_is_redrawn_for_every_sample(samples):
  heads = [s["input"][:s["context_start"]] for s in samples("vt", 4096)]
  assert len(set(heads)) == len(heads)


# ----------------------------------------------------------------------------------------------------------
# CWE.

def numbered_words(text):
  parts = re.split(r"(?:^| )(\d+)\. ", text)
  numbers, words = [int(n) for n in parts[1::2]], parts[2::2]
  assert numbers == list(range(1, len(numbers) + 1))
  return words


@pytest.mark.parametrize("length", LENGTHS)
def test_cwe_gold_words_are_the_most_common(length, samples):
  common_repeats, other_repeats = (6, 1) if length < 4096 else (30, 3)
  for sample in samples("cwe", length):
    counts = collections.Counter(numbered_words(context_of(sample)))
    assert len(sample["outputs"]) == 10
    assert {counts[word] for word in sample["outputs"]} == {common_repeats}
    assert {count for word, count in counts.items() if word not in sample["outputs"]} == {other_repeats}
    assert sample["answer_prefix"] == " Answer: The top 10 words that appear most often in the list are:"
    assert sample["input"].endswith("\nQuestion: What are the 10 most common words in the above list?")

    # One-shot example first: same template, then its answer " 1. w1 ... 10. w10".
    head = sample["input"][:sample["context_start"]]
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    assert head.startswith(intro) and head.endswith("\n" + intro)
    example, answer = head[len(intro):-len(intro) - 1].split(
        "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
        "appear most often in the list are: ")
    example_counts = collections.Counter(numbered_words(example))
    example_gold = numbered_words(answer)
    assert len(example_gold) == 10 and len(example_counts) == (40 if length >= 4096 else 20)
    assert {example_counts[word] for word in example_gold} == {10 if length >= 4096 else 3}


# ----------------------------------------------------------------------------------------------------------
# FWE.

@pytest.mark.parametrize("length", LENGTHS)
def test_fwe_gold_words_are_the_three_most_frequent_coded_words(length, samples):
  for sample in samples("fwe", length):
    assert sample["input"].startswith(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. ")
    assert sample["input"].endswith(
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
        "frequently appeared words in the above coded text?")
    assert sample["answer_prefix"] == (
        " Answer: According to the coded text above, the three most frequently appeared words are:")
    counts = collections.Counter(context_of(sample).split(" "))
    ranked = counts.most_common()
    assert ranked[0][0] == "..."
    coded = [(word, count) for word, count in ranked if word != "..."]
    assert [word for word, _ in coded[:3]] == sample["outputs"]
    assert coded[2][1] > coded[3][1]  # no tie with the fourth
    assert all(re.fullmatch(r"[a-z]{6}", word) for word, _ in coded)
    assert len(counts) <= length // 50


# ----------------------------------------------------------------------------------------------------------
# QA.

QA_INTRO = ("Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.")


def documents_of(sample):
  parts = re.split(r"(?:^|\n\n)Document (\d+):\n", context_of(sample))
  assert parts[0] == ""
  assert [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
  return parts[2::2]


def question_of(sample):
  return re.search(r"\n\nQuestion: (.*)$", sample["input"], re.S).group(1)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task,dataset", [("qa_1", "squad"), ("qa_2", "hotpotqa")])
def test_qa_documents_hold_the_answer(task, dataset, length, samples):
  records = ruler.load_squad() if dataset == "squad" else ruler.load_hotpotqa()
  for sample in samples(task, length):
    assert sample["input"].startswith(f"{QA_INTRO}\n\nThe following are given documents.\n\nDocument 1:\n")
    assert f"\n\n{QA_INTRO}\n\nQuestion: " in sample["input"]
    assert sample["answer_prefix"] == " Answer:"
    documents = documents_of(sample)
    assert len(documents) == len(set(documents))
    question = question_of(sample)
    matches = [r for r in records if r["question"] == question and r["answers"] == sample["outputs"]]
    assert matches, question
    assert any(ruler.is_ruler_eval_question(dataset, r["id"]) for r in matches)
    record = matches[0]
    assert set(record["gold_paragraphs"]) <= set(documents)
    if dataset == "squad":
      assert any(answer in record["gold_paragraphs"][0] for answer in sample["outputs"])
    else:
      assert all(p.split("\n", 1)[0] and "\n" in p for p in documents)  # "title\ntext"


def test_qa_train_pool_has_no_eval_question(tokenizer):
  for sample in ruler.generate("qa_1", 2048, 3, SEED, tokenizer, question_pool="train"):
    question = question_of(sample)
    ids = [r["id"] for r in ruler.load_squad() if r["question"] == question]
    assert ids and not any(ruler.is_ruler_eval_question("squad", i) for i in ids)


def test_eval_split_rule():
  squad, hotpotqa = ruler.load_squad(), ruler.load_hotpotqa()
  assert len(squad) == 5928 and len(hotpotqa) == 7405  # answerable SQuAD v2 dev; HotpotQA dev
  assert all(r["answers"] and len(r["gold_paragraphs"]) == 1 for r in squad)
  assert all(len(r["gold_paragraphs"]) >= 2 for r in hotpotqa)
  for dataset, records in (("squad", squad), ("hotpotqa", hotpotqa)):
    share = sum(ruler.is_ruler_eval_question(dataset, r["id"]) for r in records) / len(records)
    assert 0.07 < share < 0.13, share
    eval_ids = {r["id"] for r in records if ruler.is_ruler_eval_question(dataset, r["id"])}
    assert ruler.qa_eval_ids(dataset) == eval_ids
  # A SQuAD paragraph's questions all fall on the same side.
  sides = collections.defaultdict(set)
  for r in squad:
    sides[r["gold_paragraphs"][0]].add(ruler.is_ruler_eval_question("squad", r["id"]))
  assert all(len(side) == 1 for side in sides.values())
  with pytest.raises(KeyError, match="not in the squad file"):
    ruler.is_ruler_eval_question("squad", "no-such-id")


# ----------------------------------------------------------------------------------------------------------
# CLI.

def test_cli_writes_one_file(tmp_path, tokenizer, capsys):
  out = tmp_path / "nested" / "niah.jsonl"
  ruler.main(["--task", "niah_single_1", "--max-seq-length", "1024", "--num-samples", "2", "--seed", "3",
              "--tokenizer", str(assets.minilm_dir()), "--out", str(out)])
  lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert lines == ruler.generate("niah_single_1", 1024, 2, 3, tokenizer)
  assert "niah_single_1: 2 samples" in capsys.readouterr().err


def test_cli_subprocess_writes_every_task(tmp_path, tokenizer):
  folder = tmp_path / "ruler_1k"
  command = [sys.executable, "-m", "e2llm_jax.data.ruler", "--task", "all", "--max-seq-length", "1024",
             "--num-samples", "1", "--seed", "3", "--tokenizer", str(assets.minilm_dir()),
             "--out", str(folder)]
  subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
  assert sorted(p.name for p in folder.iterdir()) == sorted(f"{task}.jsonl" for task in ruler.TASKS)
  for task in ruler.TASKS:
    lines = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == ruler.generate(task, 1024, 1, 3, tokenizer)
