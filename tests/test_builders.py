"""TFDS builders without TensorFlow: jsonl layouts, bad lines (stop or skip and count), long_qa split.

Each dataset is built into a temporary folder (array_record) and read back with `tfds.data_source`.
"""

import importlib.util
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from e2llm_jax.data import builders
from e2llm_jax.data.builders import jsonl, long_qa

LONGBENCH_V1 = {"context": "Long text.", "input": "What?", "answers": ["one", "uno"], "_id": "v1-a",
                "length": 2, "dataset": "hotpotqa", "all_classes": None}
LONGBENCH_V2 = {"_id": "v2-a", "domain": "d", "context": "Story.", "question": "Who?",
                "choice_A": "Ann", "choice_B": "Bob", "choice_C": "Cy", "choice_D": "Di",
                "answer": "C"}
SCROLLS = {"id": "s-1", "pid": "s-1_0", "input": "Query\n\nTranscript text.", "output": "A summary."}
PLAIN = {"context": "Ctx.", "prompt": "Ask", "answer": "Reply"}


def setup_module():
  tfds.disable_progress_bar()


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def write(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                          for line in lines))
  return path


def read_all(name, data_dir, split="train"):
  source = tfds.data_source(name, split=split, data_dir=str(data_dir))
  return [builders.decode_record(source[i]) for i in range(len(source))]


def test_jsonl_detects_each_files_layout_and_normalises(tmp_path):
  paths = [write(tmp_path / "lb1.jsonl", [LONGBENCH_V1, "", {**LONGBENCH_V1, "_id": "v1-b"}]),
           write(tmp_path / "lb2.jsonl", [LONGBENCH_V2]),
           write(tmp_path / "scrolls.jsonl", [SCROLLS]),
           write(tmp_path / "plain.jsonl", [PLAIN])]
  _, stats = jsonl.build(paths, tmp_path / "tfds", name="mixed")
  assert list(stats.layouts.values()) == ["longbench_v1", "longbench_v2", "scrolls", "plain"]
  assert stats.num_skipped == 0 and sum(stats.records.values()) == 5
  by_id = {r["id"]: r for r in read_all("jsonl/mixed", tmp_path / "tfds")}
  assert sorted(by_id) == ["plain:1", "s-1", "v1-a", "v1-b", "v2-a"]
  assert by_id["v1-a"] == {"id": "v1-a", "context": "Long text.", "prompt": "What?", "answer": "one",
                           "answers": ["one", "uno"], "source": "lb1", "preamble": ""}
  assert by_id["v2-a"]["answer"] == "C" and by_id["v2-a"]["answers"] == ["C"]
  assert by_id["v2-a"]["prompt"] == "Question: Who?\nChoices:\n(A) Ann\n(B) Bob\n(C) Cy\n(D) Di"
  assert (by_id["s-1"]["context"], by_id["s-1"]["prompt"], by_id["s-1"]["answer"]) == (
      "Query\n\nTranscript text.", "", "A summary.")
  assert (by_id["plain:1"]["prompt"], by_id["plain:1"]["answers"]) == ("Ask", ["Reply"])


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
  path = write(tmp_path / "bad.jsonl", [LONGBENCH_V1, {"context": "x", "input": "y"}])
  with pytest.raises(jsonl.BadLineError, match=r"bad\.jsonl, line 2 .*missing field.*answers"):
    jsonl.build([path], tmp_path / "tfds", name="strict")
  path = write(tmp_path / "bad2.jsonl", [LONGBENCH_V1, "{oops"])
  with pytest.raises(jsonl.BadLineError, match=r"bad2\.jsonl, line 2 .*not valid JSON"):
    jsonl.build([path], tmp_path / "tfds", name="strict2")
  path = write(tmp_path / "bad3.jsonl", [{"text": "no known layout"}])
  with pytest.raises(jsonl.BadLineError, match=r"bad3\.jsonl, line 1: .*match no layout"):
    jsonl.build([path], tmp_path / "tfds", name="strict3")
  path = write(tmp_path / "bad4.jsonl", [{**LONGBENCH_V2, "answer": "E"}])
  with pytest.raises(jsonl.BadLineError, match=r"bad4\.jsonl, line 1: .*'answer'"):
    jsonl.build([path], tmp_path / "tfds", name="strict4")


def test_jsonl_skips_and_counts_bad_lines(tmp_path):
  path = write(tmp_path / "mixed.jsonl", [LONGBENCH_V1, "[1, 2]", {**LONGBENCH_V1, "answers": []},
                                          "not json", {**LONGBENCH_V1, "_id": "v1-c"}])
  builder, stats = jsonl.build([path], tmp_path / "tfds", name="lenient", skip_bad_lines=True)
  assert stats.num_skipped == 3 and stats.records == {str(path): 2}
  assert [line.split(": ")[0] for line in stats.bad_lines] == [
      f"{path}, line {n} (layout longbench_v1, detected from line 1)" for n in (2, 3, 4)]
  assert builder.info.metadata["num_skipped"] == 3
  # The counts are saved with the dataset and come back from a later build call or a reader.
  _, again = jsonl.build([path], tmp_path / "tfds", name="lenient", skip_bad_lines=True)
  assert again.num_skipped == 3
  reread = tfds.builder_from_directory(str(builder.data_dir))
  assert reread.info.metadata["skipped"] == {str(path): 3}
  assert len(read_all("jsonl/lenient", tmp_path / "tfds")) == 2
  other = write(tmp_path / "other.jsonl", [PLAIN])
  with pytest.raises(ValueError, match="another name"):
    jsonl.build([other], tmp_path / "tfds", name="lenient")


def test_long_qa_excludes_ruler_eval_questions(tmp_path):
  from e2llm_jax.data import ruler  # pylint: disable=g-import-not-at-top
  builder = long_qa.build(tmp_path, name="tiny", context_words=400, max_questions=40)
  counts = builder.info.metadata
  records = read_all("long_qa/tiny", tmp_path) + read_all("long_qa/tiny", tmp_path, "validation")
  assert len(records) == 80
  assert counts["squad"]["ruler_eval_excluded"] > 0 and counts["hotpotqa"]["ruler_eval_excluded"] > 0
  eval_gold = set()
  for dataset, questions in (("squad", ruler.load_squad()), ("hotpotqa", ruler.load_hotpotqa())):
    eval_gold |= {p for q in questions if ruler.is_ruler_eval_question(dataset, q["id"])
                  for p in q["gold_paragraphs"]}
    gold = {q["id"]: q["gold_paragraphs"] for q in questions}
    mine = [r for r in records if r["source"] == f"long_qa/{dataset}"]
    assert len(mine) == 40
    for record in mine:
      question_id = record["id"].split(":", 1)[1]
      assert not ruler.is_ruler_eval_question(dataset, question_id)
      assert all(paragraph in record["context"] for paragraph in gold[question_id])
  for record in records:
    documents = record["context"].split("\n\nDocument ")
    assert not any(paragraph in record["context"] for paragraph in eval_gold)
    assert len(documents) > 1 and len(record["context"].split()) <= 400 + 40
    assert record["answer"] == record["answers"][0] and record["prompt"]
  # The same settings rebuild the same records; other settings under the same name are refused.
  long_qa.build(tmp_path / "again", name="tiny", context_words=400, max_questions=40)
  assert read_all("long_qa/tiny", tmp_path / "again") == read_all("long_qa/tiny", tmp_path)
  with pytest.raises(ValueError, match="another name"):
    long_qa.build(tmp_path, name="tiny", context_words=500, max_questions=40)


def test_decode_record_reads_the_normalised_and_ruler_layouts():
  stored = {"id": b"a", "context": b"C", "prompt": b"P", "answer": b"A",
            "answers": np.array([b"A", b"B"], dtype=object), "source": b"s"}
  assert builders.decode_record(stored) == {"id": "a", "context": "C", "prompt": "P", "answer": "A",
                                            "answers": ["A", "B"], "source": "s", "preamble": ""}
  assert builders.decode_record({"context": "C", "answers": ["x"]})["answer"] == "x"
  with pytest.raises(KeyError, match="answer"):
    builders.decode_record({"context": "C"})
  assert builders.decode_record({"context": "C"}, require_answer=False)["answers"] == []
  # RULER's layout (ruler.generate, ruler_synthetic): instruction ‖ haystack ‖ question.
  ruler_record = {"index": np.int32(7), "task": b"niah_multivalue", "input": b"Read this.\nHAY\nWhat?",
                  "outputs": np.array([b"1", b"2"], dtype=object), "answer_prefix": b" Answer:",
                  "context_start": np.int32(11), "context_end": np.int32(14)}
  assert builders.decode_record(ruler_record) == {
      "id": "niah_multivalue:7", "context": "HAY", "prompt": "\nWhat? Answer:", "answer": "1, 2",
      "answers": ["1", "2"], "source": "niah_multivalue", "preamble": "Read this.\n"}
  # For RULER's qa tasks the outputs are alternatives: the target is the first one.
  assert builders.decode_record({**ruler_record, "task": b"qa_1"})["answer"] == "1"
