"""Evaluation: runner × predictors × report on a reading fake engine, held-out streams, passkey over processes.

The fake engine answers with the magic numbers it can read in what it is given, so scores show what
each method actually passes to the decoder.
"""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
import transformers

from configs import tiny
from e2llm_jax import assets, errors
from e2llm_jax.data import chunking, pipeline, ruler, seeds
from e2llm_jax.data.builders import ruler_synthetic
from e2llm_jax.evaluation import held_out, predictors, report, runner
from e2llm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 11
LENGTH = 1024
CHUNK_TOKENS = 64
NEEDLE_VALUE = re.compile(r"special magic numbers? for ([\w-]+) is: (\d+)")


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())


@dataclasses.dataclass
class FakeSoftContext:
  text: str
  compression_ratio: float


class ReadingEngine:
  """The engine API the predictors use; its "model" answers every magic number for the asked key."""

  def __init__(self, tokenizer, window=4096, tokens_per_chunk=2):
    self.decoder_tokenizer = tokenizer
    self.decoder_window = window
    self.tokens_per_chunk = tokens_per_chunk
    self.chunker = chunking.Chunker(tokenizer, CHUNK_TOKENS)
    self.calls = []

  def chunk(self, text):
    return [text[start:end] for start, end in self.chunker(text).spans]

  def compress(self, texts):
    return [FakeSoftContext(t, len(self.decoder_tokenizer(t, add_special_tokens=False)["input_ids"])
                            / (len(self.chunk(t)) * self.tokens_per_chunk)) for t in texts]

  @staticmethod
  def _answer(text, question):
    asked = re.search(r"for ([\w-]+) mentioned", question)
    return " ".join(value for key, value in NEEDLE_VALUE.findall(text)
                    if asked and key == asked.group(1))

  def generate_batch(self, questions, contexts, max_new_tokens, template=None):
    self.calls.append(("generate_batch", len(questions), max_new_tokens, template))
    return [self._answer(c.text, q) for q, c in zip(questions, contexts)]

  def generate_text(self, prompts, max_new_tokens):
    self.calls.append(("generate_text", len(prompts), max_new_tokens, None))
    return [self._answer(p, p) for p in prompts]

  def embed_texts(self, texts):
    # Bag of lowercased words hashed into 256 bins: chunks sharing the question's words score high.
    # crc32, not hash(): str hashes change with every process, and so would the ranking.
    vectors = np.zeros((len(texts), 256), np.float32)
    for row, text in enumerate(texts):
      for word in re.findall(r"[a-z]+", text.lower()):
        vectors[row, zlib.crc32(word.encode()) % 256] += 1
    return vectors


@pytest.fixture(scope="module")
def results(tokenizer):
  engine = ReadingEngine(tokenizer)
  tasks = runner.parse_tasks("niah_single_1,niah_single_2", tokenizer, SEED)
  methods = predictors.make_predictors(engine, ["full", "none", "rag"], engine.tokens_per_chunk)
  return engine, runner.evaluate(tasks, [512, LENGTH], methods, num_samples=3, batch_size=2)


def test_rows_score_each_method_on_the_same_samples(results):
  engine, found = results
  rows = {(r["task"], r["length"], r["method"]): r for r in found["rows"]}
  assert len(rows) == 2 * 2 * 4
  for task in ("niah_single_1", "niah_single_2"):
    for length in (512, LENGTH):
      assert rows[task, length, "e2llm"]["score"] == 100.0  # the fake reads the whole context
      assert rows[task, length, "full"]["score"] == 100.0  # fits the window: nothing cut
      assert rows[task, length, "none"]["score"] == 0.0
      assert rows[task, length, "none"]["compression_ratio"] is None
      assert rows[task, length, "full"]["compression_ratio"] == pytest.approx(1.0)
      assert rows[task, length, "e2llm"]["compression_ratio"] > 8  # 62 text tokens per 2 soft
      assert rows[task, length, "rag"]["compression_ratio"] > 2  # the best chunk: over a 2x budget
      for row in (rows[task, length, m] for m in ("e2llm", "full", "none", "rag")):
        assert row["num_samples"] == 3 and row["metric"] == "ruler_all"
        assert row["seconds_per_sample"] > 0
  # Batches of 2 (then 1) per call; RULER's NIAH answer budget.
  assert {c[1] for c in engine.calls} == {1, 2} and {c[2] for c in engine.calls} == {128}
  ids = {}
  for sample in found["samples"]:
    ids.setdefault((sample["task"], sample["length"]), set()).add((sample["method"], sample["id"]))
  for key, pairs in ids.items():  # every method answered the same samples
    assert {m for m, _ in pairs} == {"e2llm", "full", "none", "rag"} and len(pairs) == 12, key


def test_rag_finds_the_needle_chunk_within_the_soft_token_budget(results):
  _, found = results
  rag = [r for r in found["rows"] if r["method"] == "rag"]
  assert np.mean([r["score"] for r in rag]) >= 75  # ranked by shared words with the question


def test_rag_keeps_to_a_stated_budget_in_document_order(tokenizer):
  engine = ReadingEngine(tokenizer)
  (sample,) = runner.RulerTask("niah_single_2", tokenizer, SEED).samples(LENGTH, 1)
  rag = predictors.RagPredictor(engine, budget_tokens=200)
  text, ratio = rag.context_text(sample, prompt_budget=4000)
  used = predictors.count_tokens(tokenizer, sample["context"]) / ratio
  assert 62 < used <= 200  # more than one chunk, within the budget
  chunks = engine.chunk(sample["context"])
  picked = [c for c in chunks if c in text]
  assert len(picked) >= 2 and text == " ".join(picked)  # whole chunks, in the document's order
  assert NEEDLE_VALUE.search(text)  # the needle's chunk shares the question's words


def test_full_context_is_cut_in_the_middle(tokenizer):
  engine = ReadingEngine(tokenizer, window=512)
  task = runner.RulerTask("niah_single_1", tokenizer, SEED)
  samples = task.samples(LENGTH, 2)
  (sample_prediction, _) = predictors.FullContextPredictor(engine).predict(samples)
  assert sample_prediction.compression_ratio > 1.5  # ~1000 context tokens into < 512
  text, kept = predictors.truncate_middle(tokenizer, "one two three four five six", 4)
  # LongBench joins the decoded halves as they are (a WordPiece decode drops the space between).
  assert (text, kept) == ("one twofive six", 4)
  assert predictors.truncate_middle(tokenizer, "one two", 4) == ("one two", 2)


def test_depth_and_report_files(results, tmp_path):
  _, found = results
  depths = [s["depth"] for s in found["samples"]]
  assert all(d is not None and 0 <= d <= 100 for d in depths)
  assert len({round(d) for d in depths if d is not None}) > 1  # needles at several depths
  written = report.write(found, tmp_path, extra={"step": 7})
  assert json.loads(written["results"].read_text())["step"] == 7
  for name in ("score_plot", "depth_heatmap"):
    assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  markdown = written["report"].read_text()
  assert "| niah_single_1 | 512 | e2llm | ruler_all | 100.00 |" in markdown
  assert "| none |" in markdown and report.DEPTH_HEATMAP in markdown
  lines = written["predictions"].read_text().splitlines()
  assert len(lines) == len(found["samples"]) and "pred" in json.loads(lines[0])
  lengths, grid = report.depth_grid(found["samples"], "none")
  assert lengths == [512, LENGTH]
  assert all(v in (None, 0.0) for row in grid for v in row) and any(v == 0.0 for row in grid for v in row)


class WindowedEngine(ReadingEngine):
  """Refuses soft-token prompts longer than its window, as the real engine does."""

  def generate_batch(self, questions, contexts, max_new_tokens, template=None):
    longest = max(len(self.chunk(c.text)) * self.tokens_per_chunk for c in contexts)
    if longest + max_new_tokens > self.decoder_window:
      raise errors.PromptTooLongError(f"a prompt of {longest} tokens exceeds the window")
    return super().generate_batch(questions, contexts, max_new_tokens, template)


def test_a_method_over_the_window_is_skipped_and_the_scored_rows_kept(tokenizer, tmp_path):
  engine = WindowedEngine(tokenizer, window=320, tokens_per_chunk=16)
  tasks = runner.parse_tasks("niah_single_1", tokenizer, SEED)
  methods = predictors.make_predictors(engine, ["none"], engine.tokens_per_chunk)
  found = runner.evaluate(tasks, [512, LENGTH], methods, num_samples=2, batch_size=2)
  rows = {(r["length"], r["method"]): r for r in found["rows"]}
  assert rows[512, "e2llm"]["score"] == 100.0 and rows[LENGTH, "none"]["score"] == 0.0
  assert rows[LENGTH, "e2llm"]["score"] is None
  assert "exceeds the window" in rows[LENGTH, "e2llm"]["skipped"]
  assert {(s["length"], s["method"]) for s in found["samples"]} == {
      (512, "e2llm"), (512, "none"), (LENGTH, "none")}
  markdown = report.write(found, tmp_path)["report"].read_text()
  assert f"- niah_single_1 at {LENGTH} for e2llm: a prompt of" in markdown
  assert "| e2llm | 100.00 | – |" in markdown  # the mean skips the row without a score


def test_jsonl_task_with_its_metric(tmp_path, tokenizer):
  path = tmp_path / "qa.jsonl"
  lines = [{"context": "One of the special magic number for red-cat is: 1234567.", "input":
            "What is the special magic number for red-cat mentioned in the provided text?",
            "answers": ["1234567"]},
           {"context": "nothing here", "input": "special magic number for blue-dog mentioned?",
            "answers": ["7654321", "other"]}]
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  (task,) = runner.parse_tasks(f"{path}:qa_f1", tokenizer, SEED)
  found = runner.evaluate([task], [LENGTH], [predictors.E2LLMPredictor(ReadingEngine(tokenizer))],
                          num_samples=0, batch_size=4)
  (row,) = found["rows"]
  assert row["length"] is None and row["metric"] == "qa_f1" and row["score"] == 50.0


@pytest.mark.parametrize("spec,message", [
    ("niah", "neither a RULER task"), ("vt:qa_f1", "takes no metric"), ("x.jsonl", "needs a metric"),
    ("missing.jsonl:qa_f1", "does not exist"), ("", "eval.tasks is empty")])
def test_bad_task_specs_are_named(spec, message, tokenizer):
  with pytest.raises(ValueError, match=message):
    runner.parse_tasks(spec, tokenizer, SEED)
  with pytest.raises(ValueError, match="eval.baselines"):
    predictors.make_predictors(None, ["ragg"])


def _pairs(records):
  """(gold answers, question) of records in RULER's layout or runner samples."""
  pairs = set()
  for record in records:
    if "input" in record:
      record = {"answers": record["outputs"], "question": record["input"][record["context_end"]:]}
    pairs.add((tuple(record["answers"]), record["question"].split("Answer:")[0].strip()))
  return pairs


@pytest.mark.parametrize("task", ["niah_single_1", "qa_1"])
def test_held_out_samples_never_appear_in_training(task, tokenizer, tmp_path):
  held = runner.RulerTask(task, tokenizer, SEED).samples(LENGTH, 16)
  train = pipeline.ruler_source(task, max_seq_length=LENGTH, num_samples=64, seed=SEED,
                                tokenizer=tokenizer).records
  assert len(_pairs(held)) == 16
  assert not _pairs(held) & _pairs(train)
  # The check can fail: the train stream itself gives back the training samples.
  same = ruler.generate(task, LENGTH, 16, seeds.stream_seed(SEED, seeds.TRAIN, task), tokenizer,
                        question_pool="train")
  assert _pairs(same) <= _pairs(train)
  # ruler_synthetic built with the run's seed: its splits hold none of the held-out samples either.
  config = ruler_synthetic.RulerSyntheticConfig(
      name=f"held_{task}", tasks=(task,), lengths=(LENGTH,), num_samples=16,
      tokenizer_path=str(assets.minilm_dir()), seed=SEED)
  builder = ruler_synthetic.RulerSynthetic(config=config, data_dir=tmp_path)
  builder.download_and_prepare()
  for split in ("train", "validation"):
    built = [ruler_synthetic.decode_example(r) for r in builder.as_data_source(split=split)]
    assert len(built) == 16 and not _pairs(held) & _pairs(built), split
  built_train = [ruler_synthetic.decode_example(r) for r in builder.as_data_source(split="train")]
  assert _pairs(built_train) <= _pairs(train)  # the same stream as the in-memory training source


def test_streams_differ_by_purpose_and_task():
  values = {seeds.stream_seed(s, p, t) for s in (0, 1, 1_000_003, -1) for p in seeds.PURPOSE_IDS
            for t in ("niah_single_1", "qa_1")}
  assert len(values) == 4 * 3 * 2
  assert seeds.stream_seed(5, seeds.TRAIN, "vt") == seeds.stream_seed(5, seeds.TRAIN, "vt")
  with pytest.raises(ValueError, match="purpose"):
    seeds.stream_seed(5, "test", "vt")


def test_passkey_exact_match_sums_over_processes():
  rng = np.random.default_rng(0)
  targets = rng.integers(26, 36, size=(8, 5))
  tokens = targets.copy()
  tokens[[1, 2, 6], 0] += 1  # rows 1, 2 and 6 wrong: 5 of 8 right
  one, rows = held_out.passkey_exact_match(tokens, targets, 4, sum_over_processes=lambda x: x)
  assert (one, rows) == (5 / 8, 8)
  halves = [held_out.passkey_exact_match(tokens[p * 4:(p + 1) * 4], targets[p * 4:(p + 1) * 4], 4,
                                         sum_over_processes=lambda x: x) for p in range(2)]
  assert [h[0] for h in halves] == [0.5, 0.75]  # what each process alone sees
  local = [np.array([round(share * n), n]) for share, n in halves]
  total = lambda _: local[0] + local[1]  # what process_allgather + sum gives every process
  for p in range(2):
    share, rows = held_out.passkey_exact_match(tokens[p * 4:(p + 1) * 4], targets[p * 4:(p + 1) * 4],
                                               4, sum_over_processes=total)
    assert (share, rows) == (one, 8)


def test_eval_cli_on_a_tiny_workdir_matches_the_training_loop(tmp_path):
  """eval.py restores the run onto all 8 devices; the loop evaluated it on one: same held-out result."""
  workdir = tmp_path / "run"
  config = tiny.get_config()
  # test_training's steps and a mesh of its: the train step's program is compiled once for both.
  config.train.steps, config.train.eval_examples, config.mesh.shape = 4, 8, (1, 1, 1)
  config.ckpt.async_save = False
  in_loop = loop.train(config, str(workdir))
  done = subprocess.run(
      [sys.executable, str(ROOT / "eval.py"), "--config", str(ROOT / "configs/tiny.py"),
       "--workdir", str(workdir), "--config.eval.num_samples=8", "--config.eval.batch_size=8"],
      capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
      check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = json.loads(done.stdout[done.stdout.index("{"):])
  assert printed["step"] == 4 and printed["examples"] == in_loop["examples"] == 8
  assert printed["exact_match"] == in_loop["exact_match"]
  np.testing.assert_allclose(printed["ift_loss"], in_loop["ift_loss"], rtol=1e-5)
  assert json.loads((workdir / "eval" / report.RESULTS_FILE).read_text()) == printed
  logged = [json.loads(line) for line in (workdir / "eval_metrics.jsonl").read_text().splitlines()]
  assert logged[-1]["step"] == 4 and logged[-1]["ift_loss"] == pytest.approx(in_loop["ift_loss"])
