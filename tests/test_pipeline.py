"""Pipeline determinism: batches depend only on (seed, step), across instances, restarts, processes.

Also the mixture weights, global-array assembly on 8 fake devices, and reading a built TFDS dataset.
"""

import functools
import json

import jax
import ml_collections
import numpy as np
import pytest
import transformers
from jax.sharding import NamedSharding, PartitionSpec

from e2llm_jax import assets, config_utils, preflight
from e2llm_jax.data import builders, pipeline, tasks

SIZES = dict(chunk_tokens=16, max_chunks=4, prefix_tokens=24, query_tokens=24, target_tokens=24,
             recon_window=2)


@functools.lru_cache(maxsize=None)
def tokenizers():
  encoder = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())
  decoder = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir(), eos_token="[SEP]")
  return encoder, decoder


def records(name, count):
  """Synthetic QA records: a key hidden among filler sentences (passkey-like)."""
  rng = np.random.default_rng(len(name))
  out = []
  for index in range(count):
    sentences = [f"Filler sentence {i} of {name} says nothing." for i in range(rng.integers(2, 12))]
    key = f"{rng.integers(10_000):04d}"
    sentences.insert(int(rng.integers(len(sentences))), f"The pass key is {key}.")
    out.append({"id": f"{name}-{index}", "context": " ".join(sentences),
                "prompt": "What is the pass key?", "answer": key})
  return out


def make(seed=0, batch=8, process_index=0, process_count=1, threads=0, weights=None,
         recon_sources=None):
  encoder, decoder = tokenizers()
  example_encoder = tasks.ExampleEncoder(encoder, decoder, tasks.ExampleSizes(**SIZES))
  sources = {"alpha": pipeline.InMemorySource(records("alpha", 20)), "beta": records("beta", 7)}
  return pipeline.Pipeline(sources, weights or {"alpha": 0.5, "beta": 0.3, "recon": 0.2},
                           example_encoder, global_batch_size=batch, seed=seed,
                           process_index=process_index, process_count=process_count,
                           num_threads=threads, recon_sources=recon_sources)


def assert_batches_equal(first, second):
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_same_seed_and_step_give_the_same_batch_and_restart_is_exact():
  one, two = make(), make()
  run = [next(one) for _ in range(3)]
  for step, batch in enumerate(run):
    assert_batches_equal(batch, two.local_batch(step))
  shapes = dict(tasks.example_shapes(tasks.ExampleSizes(**SIZES)))
  assert {k: v.shape[1:] for k, v in run[0].items()} == {**shapes, "source_id": ()}
  assert run[0]["chunk_ids"].shape[0] == 8
  # Restart from the state saved after step 1, in a fresh pipeline (with prefetch threads).
  state = json.loads(json.dumps(make().get_state()))
  assert state == {"step": 0}
  resumed = make(threads=2)
  resumed.set_state({"step": 1})
  assert_batches_equal(next(resumed), run[1])
  assert_batches_equal(next(resumed), run[2])
  assert resumed.get_state() == {"step": 3}
  # Another seed gives other batches.
  assert not np.array_equal(make(seed=1).local_batch(0)["chunk_ids"], run[0]["chunk_ids"])


def test_processes_get_disjoint_slices_whose_union_is_the_global_batch():
  whole = make().local_batch(5)
  halves = [make(process_index=p, process_count=2) for p in range(2)]
  assert [list(h.local_slots()) for h in halves] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for h in halves:
    h.set_state({"step": 5})
  parts = [next(h) for h in halves]
  assert_batches_equal({k: np.concatenate([p[k] for p in parts]) for k in whole}, whole)
  with pytest.raises(ValueError, match="divisible"):
    make(batch=7, process_count=2)


def test_mixture_follows_the_weights_and_recon_reads_other_sources():
  mix = make(weights={"alpha": 0.5, "beta": 0.25, "recon": 0.25})
  choices = [mix.choose(step, slot) for step in range(250) for slot in range(8)]
  counts = {name: sum(c.task == name for c in choices) / len(choices) for name in mix.task_names}
  assert counts == pytest.approx({"alpha": 0.5, "beta": 0.25, "recon": 0.25}, abs=0.04)
  recon_sources = {c.source for c in choices if c.task == "recon"}
  assert recon_sources == {"alpha", "beta"}
  assert all(c.record_index < len(mix.sources[c.source]) for c in choices)
  batch = mix.local_batch(0)
  is_recon = batch["task"] == tasks.TASK_RECONSTRUCTION
  assert np.array_equal(is_recon, batch["source_id"] == mix.task_names.index("recon"))
  # A reconstruction example sees only its window of chunks.
  assert (batch["chunk_mask"][is_recon].sum(-1) <= SIZES["recon_window"]).all()


def test_reconstruction_alone_restates_the_named_sources():
  only_recon = make(weights={"recon": 1.0}, recon_sources=["beta"])
  choices = [only_recon.choose(step, slot) for step in range(20) for slot in range(8)]
  assert {(c.task, c.source) for c in choices} == {("recon", "beta")}
  batch = only_recon.local_batch(0)
  assert (batch["task"] == tasks.TASK_RECONSTRUCTION).all()
  config = config_utils.base_config()
  config.data.tasks = ml_collections.ConfigDict({"recon": 1.0})
  assert any("only 'recon'" in p for p in preflight.value_problems(config))
  config.data.recon_sources = ("niah_multikey_2",)
  assert not any("recon" in p for p in preflight.value_problems(config))


def test_global_batch_on_eight_devices():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  local = make().local_batch(0)
  arrays = pipeline.global_batch(local, sharding, process_index=0, process_count=1)
  assert arrays["chunk_ids"].shape == local["chunk_ids"].shape
  assert arrays["chunk_ids"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["target_ids"]), local["target_ids"])
  # As process 1 of 2 this process would own rows 4..7, but the sharding gives it all eight.
  with pytest.raises(ValueError, match="rows"):
    pipeline.global_batch(make(process_index=1, process_count=2).local_batch(0), sharding,
                          process_index=1, process_count=2)


def test_bad_record_names_source_step_and_record():
  encoder, decoder = tokenizers()
  example_encoder = tasks.ExampleEncoder(encoder, decoder, tasks.ExampleSizes(**SIZES))
  broken = pipeline.Pipeline({"bad": [{"context": "Text.", "prompt": "q"}]}, {"bad": 1.0},
                             example_encoder, global_batch_size=2, seed=0)
  with pytest.raises(RuntimeError, match=r"step 0, slot 0 from record 0 of source 'bad'.*answer"):
    next(broken)
  with pytest.raises(ValueError, match="no source"):
    pipeline.Pipeline({}, {"missing": 1.0}, example_encoder, global_batch_size=2, seed=0)


def test_make_pipeline_from_config_reads_a_built_tfds_dataset(tmp_path):
  from e2llm_jax.data.builders import jsonl  # pylint: disable=g-import-not-at-top
  path = tmp_path / "mine.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records("mine", 5)))
  jsonl.build([path], tmp_path / "tfds", name="mine")
  config = ml_collections.ConfigDict({
      "seed": 3, "train": {"batch_size": 4},
      "data": {**SIZES, "tasks": {"mine": 0.7, "memory": 0.3}, "data_dir": str(tmp_path / "tfds"),
               "tfds_names": {"mine": "jsonl/mine"}, "templates": {"mine": "plain"},
               "chunk_overlap": 2, "overlong_policy": "head"}})
  encoder, decoder = tokenizers()
  built = pipeline.make_pipeline(config, encoder, decoder,
                                 sources={"memory": records("memory", 3)},
                                 process_index=0, process_count=1)
  batch = next(built)
  assert batch["chunk_ids"].shape == (4, 4, 16)
  from_tfds = batch["source_id"] == built.task_names.index("mine")
  assert from_tfds.any()
  query = decoder.decode(batch["query_ids"][np.argmax(from_tfds)], skip_special_tokens=True)
  assert query == "what is the pass key?"  # the `plain` template: no "Question:" label
  config.data.data_dir = None
  with pytest.raises(ValueError, match="data_dir"):
    pipeline.make_pipeline(config, encoder, decoder, process_index=0, process_count=1)


def test_ruler_task_names_generate_sources_in_memory():
  encoder, decoder = tokenizers()
  config = ml_collections.ConfigDict({
      "seed": 0, "train": {"batch_size": 2},
      "data": {**SIZES, "max_chunks": 8, "prefix_tokens": 48, "query_tokens": 48,
               "tasks": {"niah_single_1": 1.0}, "ruler_samples": 4, "data_dir": None}})
  built = pipeline.make_pipeline(config, encoder, decoder, process_index=0, process_count=1)
  source = built.sources["niah_single_1"]
  assert len(source) == 4
  record = source[0]
  # RULER's preamble becomes the text before the soft tokens; the question comes after them.
  record = builders.decode_record(record)
  template = tasks.resolve_template(built.template_for("niah_single_1", record))
  preamble = tasks.split_template(template, "")[0]
  assert "hidden within the following text" in preamble and preamble not in record["context"]
  assert record["answer"] in record["context"] and "What is the special magic" in record["prompt"]
  batch = next(built)
  prefix = decoder.decode(batch["prefix_ids"][0], skip_special_tokens=True)
  assert "hidden within the following text" in prefix
  assert batch["chunks_dropped"].sum() == 0 and batch["prompt_tokens_dropped"].sum() == 0
