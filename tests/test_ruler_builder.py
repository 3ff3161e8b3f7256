"""Tests of the TFDS builder `ruler_synthetic`: builds as array_record and reads back without TensorFlow.

Records read back must equal `data.ruler.generate` output for the split's seed and QA question pool.
"""

import importlib.util

import pytest
import tensorflow_datasets as tfds
import transformers

from e2llm_jax import assets
from e2llm_jax.data import ruler, seeds
from e2llm_jax.data.builders import ruler_synthetic

TASKS = ("niah_single_1", "qa_1")
LENGTHS = (1024, 2048)
NUM_SAMPLES = 2
SEED = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  config = ruler_synthetic.RulerSyntheticConfig(
      name="test_tiny", tasks=TASKS, lengths=LENGTHS, num_samples=NUM_SAMPLES,
      tokenizer_path=str(assets.minilm_dir()), seed=SEED)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = ruler_synthetic.RulerSynthetic(config=config, data_dir=data_dir)
  builder.download_and_prepare()
  return builder, data_dir


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


@pytest.mark.parametrize("split,pool", [("validation", "eval"), ("train", "train")])
def test_reads_back_what_the_generator_makes(built, split, pool):
  builder, _ = built
  source = builder.as_data_source(split=split)
  assert len(source) == len(TASKS) * len(LENGTHS) * NUM_SAMPLES
  records = sorted((ruler_synthetic.decode_example(source[i]) for i in range(len(source))),
                   key=lambda r: (r["task"], r["max_seq_length"], r["index"]))
  tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())
  expected = []
  for task in sorted(TASKS):
    for length in LENGTHS:
      seed = seeds.stream_seed(SEED, split, task)
      for sample in ruler.generate(task, length, NUM_SAMPLES, seed, tokenizer, question_pool=pool):
        expected.append({
            "task": task, "max_seq_length": length, "index": sample["index"], "input": sample["input"],
            "outputs": sample["outputs"], "answer_prefix": sample["answer_prefix"],
            "length": sample["length"], "context_start": sample["context_start"],
            "context_end": sample["context_end"]})
  assert records == expected


def test_splits_differ_and_read_by_name(built):
  builder, data_dir = built
  inputs = lambda split: {ruler_synthetic.decode_example(r)["input"]
                          for r in builder.as_data_source(split=split)}
  validation, train = inputs("validation"), inputs("train")
  assert not validation & train
  by_name = tfds.data_source("ruler_synthetic/test_tiny", data_dir=data_dir, split="validation[:3]")
  assert len(by_name) == 3
  assert isinstance(by_name[0]["input"], bytes)  # Text features come back as bytes


def test_unknown_task_fails_before_building(tmp_path):
  config = ruler_synthetic.RulerSyntheticConfig(name="test_bad", tasks=("niah",), tokenizer_path="unused")
  builder = ruler_synthetic.RulerSynthetic(config=config, data_dir=tmp_path)
  with pytest.raises(ValueError, match="Unknown RULER task 'niah'"):
    builder.download_and_prepare()


def test_presets_cover_every_task():
  for config in ruler_synthetic.RulerSynthetic.BUILDER_CONFIGS:
    assert config.tasks == tuple(ruler.TASKS)
    assert config.tokenizer_path == ""  # the bundled SmolLM2 GGUF, so no machine path in the repo
