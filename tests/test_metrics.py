"""Scorers against hand-computed values and the reference back-ends (`rouge`, `rouge_score`).

Edge cases: empty predictions, several references, punctuation, articles, case, control characters, unicode.
"""

import difflib
import json
import math
import pathlib
import subprocess
import sys

import pytest
import rouge
from rouge_score import rouge_scorer

from e2llm_jax import errors
from e2llm_jax.evaluation import metrics, score

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_metric(name, samples, **options):
  return metrics.score(name, samples, **options)


def test_registry_names():
  assert set(metrics.METRICS) == {"ruler_all", "ruler_part", "qa_f1", "rouge_l", "gmean", "lbv2_acc",
                                  "em", "classification", "count", "retrieval", "code_sim"}
  with pytest.raises(ValueError, match="unknown metric 'f1'"):
    metrics.get_metric("f1")


def test_ruler_string_match_all_and_part():
  samples = [
      {"pred": "The numbers are 123 and 456.", "answers": ["123", "456", "789"]},  # 2 of 3
      {"pred": " \x00ABC-def\x07 ", "answers": ["abc-DEF"]},  # control chars, case
      {"pred": "", "answers": ["1"]},  # empty prediction
  ]
  result = run_metric("ruler_all", samples)
  assert result["per_sample"] == [2 / 3, 1.0, 0.0]
  assert result["score"] == round(100 * (2 / 3 + 1) / 3, 2) == 55.56
  part = run_metric("ruler_part", samples)
  assert part["per_sample"] == [1.0, 1.0, 0.0] and part["score"] == 66.67
  assert metrics.ruler_postprocess("  a\x01b\x1fc\n ") == "a\nb\nc"
  assert metrics.ruler_postprocess("a\x7fb") == "a\x7fb"  # only [\x00-\x1f] is replaced
  # A control character can split a gold string, as in RULER.
  assert run_metric("ruler_all", [{"pred": "12\x0034", "answers": ["1234"]}])["score"] == 0.0


def test_ruler_task_rule_is_defined_once():
  assert metrics.ruler_metric_name("qa_1") == metrics.ruler_metric_name("qa_2") == "ruler_part"
  for task in ("niah_single_1", "niah_multivalue", "vt", "cwe", "fwe"):
    assert metrics.ruler_metric_name(task) == "ruler_all"
  assert metrics.ruler_score("qa_1", ["Paris"], [["paris", "Lyon"]]) == 100.0
  assert metrics.ruler_score("niah_multivalue", ["paris"], [["paris", "Lyon"]]) == 50.0


def test_normalize_answer_and_qa_f1():
  assert metrics.normalize_answer("The  Eiffel-Tower, a landmark!") == "eiffeltower landmark"
  assert metrics.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
  # "big red dog" vs "red cat": one shared token, precision 1/3, recall 1/2.
  assert metrics.qa_f1_score("a big red dog", "the red cat") == pytest.approx(0.4)
  assert metrics.qa_f1_score("", "red cat") == 0.0
  assert metrics.qa_f1_score("The", "a") == 0.0  # only articles: nothing left to match
  # Unicode: lowercased, but only ASCII punctuation is removed and accents stay.
  assert metrics.qa_f1_score("Ünïcode CAFÉ", "ünïcode cafe") == pytest.approx(0.5)
  assert metrics.qa_f1_score("red red red", "red") == pytest.approx(0.5)  # multiset overlap
  # Max over several references.
  result = run_metric("qa_f1", [{"pred": "red cat", "answers": ["blue dog", "the red cat"]},
                                {"pred": "x", "answers": ["y"]}])
  assert result["per_sample"] == [1.0, 0.0] and result["score"] == 50.0


@pytest.mark.parametrize("prediction,gold", [
    ("the cat sat on the mat. it was happy", "The cat sat. The mat was red and the cat was happy"),
    ("A completely different sentence", "nothing in common here at all"),
    ("Summary: the meeting covered budgets.", "The meeting covered budgets and hiring."),
    ("Café résumé naïve.", "café résumé"),
])
def test_rouge_l_matches_the_rouge_package(prediction, gold):
  expected = rouge.Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"]
  assert metrics.rouge_l_score(prediction, gold) == expected
  assert 0 < expected or "different" in prediction


def test_rouge_l_errors_score_zero_and_case_matters():
  assert metrics.rouge_l_score("", "some gold") == 0.0  # the package raises on an empty hypothesis
  assert metrics.rouge_l_score("...", "some gold") == 0.0
  assert metrics.rouge_l_score("THE CAT", "the cat") == 0.0  # case-sensitive, no stemming
  result = run_metric("rouge_l", [{"pred": "the cat", "answers": ["a dog", "the cat"]}])
  assert result["score"] == 100.0


def test_first_line_rule():
  sample = {"pred": "\n\nLocation\nNumber Number", "answers": ["Number"],
            "all_classes": ["Location", "Number"]}
  assert run_metric("classification", [sample], dataset="trec")["score"] == 100 * 0.0
  # Without the rule both classes are found: 1/2 for the gold one.
  assert run_metric("classification", [sample], dataset="gov_report")["score"] == 50.0
  sample = {"pred": "Paris\nLondon is the answer", "answers": ["London"]}
  assert run_metric("qa_f1", [sample], dataset="triviaqa")["score"] == 0.0
  assert run_metric("qa_f1", [sample], first_line_only=True)["score"] == 0.0
  assert run_metric("qa_f1", [sample])["score"] > 0
  assert metrics.first_line("\n\nfirst\nsecond") == "first"


def test_classification_keeps_longbench_removal_order():
  # LongBench removes "a" while iterating, which skips "ab": "ab" stays among the matches.
  assert metrics.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
  assert metrics.classification_score("Human being", "Human being",
                                      all_classes=["Human being", "Number"]) == 1.0
  assert metrics.classification_score("", "Number", all_classes=["Number"]) == 0.0
  assert metrics.classification_score("number", "Number", all_classes=["Number"]) == 0.0  # case


def test_count_and_retrieval():
  assert metrics.count_score("There are 5 paragraphs, not 3 or 5.", "5") == pytest.approx(2 / 3)
  assert metrics.count_score("no digits", "5") == 0.0
  assert metrics.count_score("15", "5") == 0.0  # whole numbers only
  assert metrics.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
  assert metrics.retrieval_score("Paragraph 1 or Paragraph 12", "Paragraph 12") == 0.5
  with pytest.raises(ValueError, match="Paragraph N"):
    metrics.retrieval_score("1", "the first one")


def test_code_similarity():
  # Fences and comments are skipped; "x = foo(1)" vs "x = foo(2)": 9 of 10 characters match.
  prediction = "\n```python\n# call foo\nx = foo(1)\ny = 2\n"
  assert metrics.code_sim_score(prediction, "x = foo(2)") == 0.9
  assert metrics.fuzz_ratio("abc", "abc") == 100 and metrics.fuzz_ratio("", "abc") == 0
  a, b = "def run(self):", "def walk(self, x):"
  assert metrics.fuzz_ratio(a, b) == round(100 * difflib.SequenceMatcher(None, a, b).ratio())
  assert metrics.code_sim_score("// only\n# comments", "x") == 0.0


def test_exact_match():
  result = run_metric("em", [{"pred": "The Answer.", "answers": ["answer"]},
                             {"pred": "(B) an ox", "answers": ["(A) an ox", "B ox"]},
                             {"pred": "", "answers": ["x"]}])
  assert result["per_sample"] == [1.0, 1.0, 0.0]


def test_longbench_v2_extraction_and_breakdown():
  assert metrics.extract_choice("The correct answer is (B).") == "B"
  assert metrics.extract_choice("**The correct answer is C**") == "C"
  assert metrics.extract_choice("The correct answer is *(D)*") == "D"
  assert metrics.extract_choice("the correct answer is (A)") is None  # case-sensitive
  assert metrics.extract_choice("I think (B)") is None
  assert metrics.extract_choice("The correct answer is (E)") is None
  samples = [
      {"pred": "The correct answer is (A)", "answer": "A", "difficulty": "easy", "length": "short"},
      {"pred": "The correct answer is B", "answer": "C", "difficulty": "hard", "length": "short"},
      {"pred": "no idea", "answer": "D", "difficulty": "hard", "length": "long"},
      {"pred": "The correct answer is (D)", "answers": ["D"], "difficulty": "hard",
       "length": "medium"},
  ]
  result = run_metric("lbv2_acc", samples)
  assert result["score"] == 50.0 and result["easy"] == 100.0 and result["hard"] == 33.3
  assert result["short"] == 50.0 and result["medium"] == 100.0 and result["long"] == 0.0
  compensated = run_metric("lbv2_acc", samples, compensated=True)
  assert compensated["score"] == round(100 * 2.25 / 4, 1) and compensated["long"] == 25.0


def test_scrolls_gmean_matches_rouge_score():
  samples = [{"pred": "The cat sat on the mat today.", "answers": ["the cat was on the mat",
                                                                  "a dog sat today"]},
             {"pred": "Budgets were discussed.", "answers": ["The meeting discussed budgets."]}]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
  means = []
  for kind in ("rouge1", "rouge2", "rougeL"):
    means.append(sum(max(scorer.score(g, s["pred"])[kind].fmeasure for g in s["answers"]) * 100
                     for s in samples) / len(samples))
  result = run_metric("gmean", samples)
  assert result["score"] == pytest.approx(math.prod(means) ** (1 / 3))
  assert result["rouge1"] == pytest.approx(means[0]) and result["rougeL"] == pytest.approx(means[2])
  assert 0 < result["score"] < 100
  assert run_metric("gmean", [{"pred": "", "answers": ["x y"]}])["score"] == 0.0


def test_missing_answers_named():
  with pytest.raises(ValueError, match="no gold answers"):
    run_metric("qa_f1", [{"pred": "x", "answers": []}])


def test_score_cli(tmp_path, capsys):
  path = tmp_path / "preds.jsonl"
  path.write_text("\n".join(json.dumps(s) for s in [
      {"pred": "The Eiffel Tower", "answers": ["eiffel tower"]},
      {"pred": "nothing", "answers": ["eiffel tower"]}]) + "\n\n")
  score.main(["--metric", "qa_f1", "--input", str(path)])
  assert json.loads(capsys.readouterr().out) == {"metric": "qa_f1", "num_samples": 2, "score": 50.0}
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"pred": "x", "answers": ["x"]}\n{"pred": \n')
  with pytest.raises(errors.DataError, match=f"{bad}:2 is not valid JSON"):
    score.main(["--metric", "qa_f1", "--input", str(bad)])
  with pytest.raises(errors.DataError, match="is not a file"):
    score.main(["--metric", "qa_f1", "--input", str(tmp_path / "none.jsonl")])


def test_score_cli_subprocess_lbv2(tmp_path):
  path = tmp_path / "v2.jsonl"
  path.write_text(json.dumps({"pred": "The correct answer is (A)", "answer": "A",
                              "difficulty": "easy", "length": "long"}) + "\n")
  done = subprocess.run([sys.executable, "-m", "e2llm_jax.evaluation.score", "--metric", "lbv2_acc",
                         "--input", str(path)], capture_output=True, text=True, cwd=ROOT,
                        check=False, timeout=120)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert result["score"] == 100.0 and result["easy"] == 100.0 and result["hard"] is None
  path.write_text(json.dumps({"pred": "The correct answer is (A)", "difficulty": "easy"}) + "\n")
  done = subprocess.run([sys.executable, "-m", "e2llm_jax.evaluation.score", "--metric", "qa_f1",
                         "--input", str(path)], capture_output=True, text=True, cwd=ROOT,
                        check=False, timeout=120)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert done.stderr.startswith("error: sample has no gold answers")
