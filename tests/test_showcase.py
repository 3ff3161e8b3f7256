"""The showcase of a shipped export on the reading fake engine: its table, worked example, files, CLI errors.

The fake (tests/test_evaluation.py) answers the magic numbers it can read, so e2llm and full score 100, none 0.
"""

import json

import pytest
import transformers

from e2llm_jax import assets, errors
from e2llm_jax.evaluation import runner, showcase
from test_evaluation import ReadingEngine

RUN_SEED = 11
LENGTH = 1024


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())


@pytest.fixture(scope="module")
def shown(tokenizer):
  engine = ReadingEngine(tokenizer)
  return showcase.run_showcase(engine, ["niah_single_1", "niah_single_2"], [512, LENGTH], 2,
                               ["none", "full"], showcase.showcase_seed(RUN_SEED), 2)


def test_table_has_one_line_per_task_and_length_and_a_column_per_method(shown):
  lines = shown["table"].splitlines()
  assert lines[0] == "| task | length | e2llm | none | full | e2llm compression |"
  body = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
  assert set(body) == {(t, str(n)) for t in ("niah_single_1", "niah_single_2", "mean")
                       for n in (512, LENGTH)}
  for key, line in body.items():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[2:5] == ["100.0", "0.0", "100.0"], key
    if key[0] != "mean":
      assert cells[5].endswith("x") and float(cells[5][:-1]) > 8  # 2 soft tokens per 64-token chunk
  assert len(shown["rows"]) == 2 * 2 * 3


def test_samples_are_fresh_not_the_runs_own_held_out_ones(tokenizer):
  fresh = runner.RulerTask("niah_single_1", tokenizer, showcase.showcase_seed(RUN_SEED))
  own = runner.RulerTask("niah_single_1", tokenizer, RUN_SEED)
  assert showcase.showcase_seed(RUN_SEED) != RUN_SEED and showcase.showcase_seed(RUN_SEED, 5) == 5
  answers = lambda task: {tuple(s["answers"]) for s in task.samples(512, 4)}
  assert not answers(fresh) & answers(own)


def test_worked_example_shows_question_needle_and_each_answer(shown):
  example = shown["example"]
  assert example["task"] == "niah_single_1" and example["length"] == 512
  (gold,) = example["gold"]
  key = example["question"].split(" for ")[1].split(" mentioned")[0]
  assert example["needle"] == f"One of the special magic numbers for {key} is: {gold}."
  assert example["question"].endswith("mentioned in the provided text?")
  assert example["predictions"]["e2llm"]["pred"] == gold
  assert example["predictions"]["none"]["pred"] == ""
  text = shown["example_text"].splitlines()
  assert text[0].startswith("Worked example (niah_single_1, 512 tokens, sample niah_single_1:0")
  assert text[1] == f"  question: {example['question']}"
  assert text[2] == f"  needle:   {example['needle']}"
  assert text[3] == f"  gold:     {gold}"
  answers = {line.split("(")[0].strip(): line for line in text[4:]}
  assert set(answers) == {"e2llm", "none", "full"}
  assert answers["e2llm"].endswith(f'"{gold}"  [right]') and "soft tokens" in answers["e2llm"]
  assert answers["none"].endswith('""  [wrong]') and "no context" in answers["none"]


def test_needle_sentence_in_prose():
  essay = "They sold nothing. One of the special magic numbers for x-y is: 123. [1]Most founders"
  assert showcase.needle_sentence(essay, "123") == "One of the special magic numbers for x-y is: 123."
  assert showcase.needle_sentence("no needle here", "123") is None


def test_out_folder_gets_results_and_a_report_with_table_and_example(shown, tmp_path):
  written = showcase.write_outputs(shown, "heading line\n", tmp_path, {"seed": 12})
  results = json.loads(written["results"].read_text())
  assert results["seed"] == 12 and results["example"]["gold"] == shown["example"]["gold"]
  assert len(results["rows"]) == len(shown["rows"])
  markdown = written["report"].read_text()
  assert markdown.startswith("# Showcase\n\nheading line\n\n" + shown["table"])
  assert shown["example_text"] in markdown and "| niah_single_1 | 512 | e2llm |" in markdown


@pytest.mark.parametrize("argv,message", [
    (["--export", "no/such/folder"], "--export 'no/such/folder' does not exist"),
    (["--tasks", "niah_single_1,needle"], "--tasks ['needle']"),
    (["--baselines", "none,ful"], "--baselines ['ful']"),
    (["--lengths", "4k"], "--lengths '4k'"),
    (["--lengths", "100"], "max_seq_length=100"),
    (["--num-samples", "0"], "--num-samples 0"),
])
def test_mistakes_stop_before_any_weights_load(argv, message, tmp_path):
  with pytest.raises(errors.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
    showcase.main(argv if argv[0] == "--export" else ["--export", str(tmp_path)] + argv)
