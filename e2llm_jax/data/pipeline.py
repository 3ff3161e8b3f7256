"""The input pipeline: a weighted task mixture, tokenized into fixed-shape batches, per-process slices.

Owns the sampling order (a pure function of (seed, step)), the iterator state, and global-array assembly.

Order. Global batch `s` has `G = global_batch_size` slots. Slot `j` of step `s` draws from its own
generator `np.random.default_rng([seed, s, j])`: first the task (by `data.tasks` weights), then a
record index of that task's source (uniform, with replacement), then, for `recon`, the window. So a batch
depends on nothing but `(seed, step)`: resuming at step `s` gives the batches an uninterrupted run would
have given, two pipelines with the same seed agree, and the iterator state is `{"step": s}`.

Processes. Process `p` of `P` builds only rows `[p·G/P, (p+1)·G/P)` of every global batch (its slots);
`global_batch` turns those rows into global `jax.Array`s with `jax.make_array_from_process_local_data`,
after checking that the sharding puts exactly those rows on this process's devices.

Tasks. A task name in `data.tasks` is a source of normalised records (`{context, prompt, answer, ...}`,
see `data.builders`) and gives instruction examples; the name `recon` gives reconstruction examples from
the contexts of the other sources (or of `recon_sources`). Sources are random-access: a TFDS
array_record dataset (`tfds_source`: `long_qa`, `jsonl/<name>`, `ruler_synthetic/<config>`), an
`InMemorySource` over a list of dicts, RULER samples generated in memory (`ruler_source`), or any sequence
of records (`make_pipeline` says which it picks). Records are in the normalised layout or RULER's (whose
instruction before the haystack becomes the text before the soft tokens, see `Pipeline.template_for`). Work runs
in Grain (`MapDataset` over example indices, thread prefetch, batching).

Batch (numpy, leading dim = local batch size): every array of `tasks.example_shapes` plus `source_id`
(index into `Pipeline.task_names`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from e2llm_jax import errors
from e2llm_jax.data import builders, seeds, tasks

RECON = "recon"
INSTRUCTION_TEMPLATE = "qa"
RECON_TEMPLATE = "recon"
RULER_FIT_SAMPLES = 8  # samples whose chunk counts size a RULER task's length
RULER_FIT_MARGIN = 0.95  # shrink a little more than the measured overflow, so the next try fits
# Example indices far beyond any run's length; Grain needs a finite dataset size.
MAX_EXAMPLES = 2**62


class InMemorySource:
  """A random-access source over records held in memory (normalised or RULER layout, see builders)."""

  def __init__(self, records: Sequence[Mapping[str, Any]]):
    self.records = list(records)
    for index, record in enumerate(self.records):
      if "context" not in record and not all(f in record for f in builders.RULER_FIELDS):
        raise ValueError(f"in-memory record {index} has no 'context' field (fields: "
                         f"{sorted(record)}); records need context, prompt and answer.")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    return self.records[index]


def tfds_source(name: str, data_dir: str, split: str = "train") -> Any:
  """A built TFDS array_record dataset (`long_qa`, `jsonl/<name>`, ...) as a random-access source."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as error:  # tfds raises several types for "not built"; one message says the fix
    # Only the first line of TFDS's text: "not found" lists every dataset TFDS knows (~600 lines).
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    raise DatasetNotBuiltError(
        f"TFDS dataset {name!r} (split {split!r}) is not built under data.data_dir={data_dir!r} "
        f"({type(error).__name__}: {first_line}); build it first (e2llm_jax/data/builders/: "
        "long_qa.build, jsonl.build, or name its JSONL files in data.jsonl_files), or fix "
        "data.tfds_names / data.data_dir") from error


class DatasetNotBuiltError(errors.DataError, FileNotFoundError):
  """A dataset named by the config is not under data.data_dir (a FileNotFoundError for callers)."""


def jsonl_source(task: str, paths: str | Sequence[str], data_dir: str, skip_bad_lines: bool) -> Any:
  """The `jsonl/<task>` dataset of `paths` ("a.jsonl,b.jsonl" or a list), built once under data_dir.

  Bad lines stop the build naming file and line, unless `skip_bad_lines` (then they are counted).
  """
  from e2llm_jax.data.builders import jsonl  # pylint: disable=g-import-not-at-top
  files = [p.strip() for p in paths.split(",") if p.strip()] if isinstance(paths, str) else list(paths)
  if not files:
    raise errors.ConfigError(f"{jsonl.FILES_KEY}.{task} names no files; give one or more paths, "
                             "comma-separated")
  builder, _ = jsonl.build(files, data_dir, name=task, skip_bad_lines=skip_bad_lines)
  return builder.as_data_source(split="train")


def ruler_source(task: str, *, max_seq_length: int, num_samples: int, seed: int, tokenizer: Any
                 ) -> InMemorySource:
  """RULER samples of `task` (training question pool, the run `seed`'s train stream), kept in RULER's
  layout (`builders.decode_record` reads it: the haystack is the context, the instruction before it the
  preamble). The `ruler_synthetic` train split built with the same seed holds the same samples."""
  from e2llm_jax.data import ruler  # pylint: disable=g-import-not-at-top
  samples = ruler.generate(task, max_seq_length, num_samples, seeds.stream_seed(seed, seeds.TRAIN, task),
                           tokenizer, question_pool="train")
  return InMemorySource([{**sample, "task": task} for sample in samples])


def fit_ruler_length(task: str, chunker: Any, max_chunks: int, tokenizer: Any, seed: int,
                     tries: int = 8) -> int:
  """A RULER max_seq_length whose contexts fill at most `max_chunks` chunks of `chunker`.

  RULER sizes whole prompts in decoder tokens (answer to generate included), while the context fills
  encoder chunks that end at sentence ends, so the length is measured: start from the encoder's capacity
  plus the answer budget and shrink by the overflow seen on a few samples.
  """
  from e2llm_jax.data import ruler  # pylint: disable=g-import-not-at-top
  answer_budget = ruler.TOKENS_TO_GENERATE[task]
  length = max_chunks * chunker.chunk_tokens + answer_budget
  for _ in range(tries):
    source = ruler_source(task, max_seq_length=length, num_samples=RULER_FIT_SAMPLES, seed=seed,
                          tokenizer=tokenizer)
    used = max(len(chunker(builders.decode_record(record)["context"])) for record in source.records)
    if used <= max_chunks:
      return length
    length = answer_budget + int((length - answer_budget) * max_chunks / used * RULER_FIT_MARGIN)
  raise ValueError(f"no RULER length fits task {task!r} into data.max_chunks={max_chunks}; set "
                   "data.ruler_max_seq_length.")


def record_template(record: Mapping[str, Any]) -> str | tasks.PromptTemplate:
  """A decoded record's own preamble before the context (RULER) as its template, else `qa`."""
  if record["preamble"]:
    return tasks.PromptTemplate(record["preamble"].replace("{", "{{").replace("}", "}}")
                                + "{context}{question}")
  return INSTRUCTION_TEMPLATE


def make_example_encoder(config: Any, encoder_tokenizer: Any, decoder_tokenizer: Any,
                         sizes: tasks.ExampleSizes | None = None) -> tasks.ExampleEncoder:
  """The run's example encoder (chunker, chat template, prompt layout) from `config.data`; `sizes`
  replaces the config's fixed sizes (inference prompts are not cut to training lengths)."""
  data = config.data
  get = lambda name, default: data[name] if name in data and data[name] is not None else default  # pylint: disable=unnecessary-lambda-assignment
  return tasks.ExampleEncoder(
      encoder_tokenizer, decoder_tokenizer, sizes or tasks.ExampleSizes.from_config(data),
      chunk_overlap=int(get("chunk_overlap", 0)),
      split_digits=bool(get("encoder_split_digits", False)),
      overlong_policy=str(get("overlong_policy", "head_tail")),
      chat_template=get("chat_template", None), system_prompt=get("system_prompt", None))


@dataclasses.dataclass(frozen=True)
class SlotChoice:
  """What one batch slot holds: its task, the source and record it reads, and its generator."""
  task: str
  source: str
  record_index: int
  rng: np.random.Generator


class Pipeline:
  """Fixed-shape batches of the task mixture; iterate for this process's local batches."""

  def __init__(self, sources: Mapping[str, Sequence[Any]], weights: Mapping[str, float],
               example_encoder: tasks.ExampleEncoder, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               templates: Mapping[str, str] | None = None,
               recon_sources: Sequence[str] | None = None, num_threads: int = 0,
               prefetch_buffer_size: int = 64, start_step: int = 0):
    if global_batch_size % process_count:
      raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the "
                       f"{process_count} processes; make it a multiple.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    weights = {name: float(w) for name, w in weights.items() if float(w) > 0}
    if not weights:
      raise ValueError("data.tasks has no task with a positive weight.")
    self.task_names = sorted(weights)  # sorted: the order of config keys must not change sampling
    self.cumulative_weights = np.cumsum([weights[n] for n in self.task_names]) / sum(weights.values())
    self.sources = dict(sources)
    missing = [n for n in self.task_names if n != RECON and n not in self.sources]
    if missing:
      raise ValueError(f"data.tasks names {missing} but no source was given for them (have "
                       f"{sorted(self.sources)}).")
    for name in self.task_names:
      if name != RECON and len(self.sources[name]) == 0:
        raise ValueError(f"source {name!r} is empty.")
    self.recon_sources: list[str] = []
    self.recon_cumulative: np.ndarray = np.zeros(0)
    if RECON in weights:
      names = list(recon_sources) if recon_sources else [n for n in self.task_names if n != RECON]
      unknown = [n for n in names if n not in self.sources]
      if not names or unknown:
        raise ValueError("the recon task needs contexts: list other sources in data.tasks or set "
                         f"data.recon_sources (unknown: {unknown}).")
      self.recon_sources = sorted(names)
      recon_weights = [weights.get(n, 1.0) for n in self.recon_sources]
      self.recon_cumulative = np.cumsum(recon_weights) / sum(recon_weights)
    self.encoder = example_encoder
    self.templates = dict(templates or {})
    for template in self.templates.values():
      tasks.resolve_template(template)  # a bad template fails here, not in a worker thread
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.seed = int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.num_threads = int(num_threads)
    self.prefetch_buffer_size = int(prefetch_buffer_size)
    self._step = int(start_step)
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None

  # -- The pure part: (seed, step, slot) → example. ------------------------------------------------

  def choose(self, step: int, slot: int) -> SlotChoice:
    """The task, source and record of global slot `slot` of step `step`."""
    rng = np.random.default_rng([self.seed, step, slot])
    index = int(np.searchsorted(self.cumulative_weights, rng.random(), side="right"))
    task = self.task_names[min(index, len(self.task_names) - 1)]  # min: float rounding of the sum
    source = task
    if task == RECON:
      index = int(np.searchsorted(self.recon_cumulative, rng.random(), side="right"))
      source = self.recon_sources[min(index, len(self.recon_sources) - 1)]
    record_index = int(rng.integers(len(self.sources[source])))
    return SlotChoice(task, source, record_index, rng)

  def example(self, step: int, slot: int) -> dict[str, np.ndarray]:
    """The example in global slot `slot` of step `step` (a pure function of seed, step and slot)."""
    choice = self.choose(step, slot)
    try:
      record = builders.decode_record(self.sources[choice.source][choice.record_index],
                                      require_answer=choice.task != RECON)
      if choice.task == RECON:
        example = self.encoder.reconstruction(record["context"], choice.rng,
                                              self.templates.get(RECON, RECON_TEMPLATE))
      else:
        example = self.encoder.instruction(record["context"], record["prompt"], record["answer"],
                                           self.template_for(choice.task, record))
    except Exception as error:
      raise RuntimeError(f"building the {choice.task} example of step {step}, slot {slot} from "
                         f"record {choice.record_index} of source {choice.source!r} failed: "
                         f"{type(error).__name__}: {error}") from error
    example["source_id"] = np.int32(self.task_names.index(choice.task))
    return example

  def template_for(self, task: str, record: Mapping[str, Any]) -> str | tasks.PromptTemplate:
    """`data.templates[task]`, else the record's own preamble before the context (RULER), else `qa`."""
    if task in self.templates:
      return self.templates[task]
    return record_template(record)

  def local_slots(self) -> range:
    """This process's slots (rows) of every global batch."""
    first = self.process_index * self.local_batch_size
    return range(first, first + self.local_batch_size)

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`, built synchronously."""
    examples = [self.example(step, slot) for slot in self.local_slots()]
    return {name: np.stack([e[name] for e in examples]) for name in examples[0]}

  # -- The iterator: Grain over example indices, state = the next step. -------------------------

  def _local_example(self, index: int) -> dict[str, np.ndarray]:
    step, row = divmod(index, self.local_batch_size)
    return self.example(step, self.local_slots()[row])

  def _make_iterator(self) -> Iterator[dict[str, np.ndarray]]:
    first = self._step * self.local_batch_size
    dataset = grain.MapDataset.range(first, MAX_EXAMPLES).map(self._local_example)
    options = grain.ReadOptions(num_threads=self.num_threads,
                                prefetch_buffer_size=self.prefetch_buffer_size)
    dataset = dataset.to_iter_dataset(options).batch(self.local_batch_size, drop_remainder=True)
    return iter(dataset)

  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_iterator()
    batch = next(self._iterator)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """The iterator state to checkpoint: the step of the next batch."""
    return {"step": self._step}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resume at `state["step"]` (from `get_state`)."""
    self._step = int(state["step"])
    self.close()  # its prefetched batches belong to the old position; rebuilt on the next call

  def close(self) -> None:
    """Stops the prefetch threads (iteration may continue: it restarts at the current step)."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None

  def next_global_batch(self, sharding: Any) -> dict[str, Any]:
    """The next batch as global jax.Arrays (every process calls this at the same step)."""
    return global_batch(next(self), sharding, process_index=self.process_index,
                        process_count=self.process_count)


def _rows_on_this_process(sharding: Any, global_shape: tuple[int, ...]) -> set[int]:
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(global_shape[0])[index[0]] if index else range(global_shape[0]))
  return rows


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: Any, *,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> dict[str, Any]:
  """Global jax.Arrays from each process's rows (`sharding`: one for all, or one per name).

  Row `r` of the global batch must live on the devices of process `r // local_batch_size`, which holds
  for a mesh whose batch axes follow process order (as `jax.make_mesh` builds it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  arrays = {}
  for name, local in local_batch.items():
    name_sharding = sharding[name] if isinstance(sharding, Mapping) else sharding
    local_rows = local.shape[0]
    global_shape = (local_rows * process_count,) + local.shape[1:]
    expected = set(range(process_index * local_rows, (process_index + 1) * local_rows))
    if _rows_on_this_process(name_sharding, global_shape) != expected:
      raise ValueError(f"the sharding of {name!r} puts other batch rows than {min(expected)}.."
                       f"{max(expected)} on process {process_index}; build the mesh with "
                       "jax.make_mesh so the batch axes follow process order.")
    arrays[name] = jax.make_array_from_process_local_data(name_sharding, local, global_shape)
  return arrays


def _is_ruler_task(name: str) -> bool:
  from e2llm_jax.data import ruler  # pylint: disable=g-import-not-at-top
  return name in ruler.TASKS


def make_pipeline(config: Any, encoder_tokenizer: Any, decoder_tokenizer: Any, *,
                  sources: Mapping[str, Sequence[Any]] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  start_step: int = 0) -> Pipeline:
  """The pipeline a training config asks for (`config.seed`, `config.train.batch_size`, `config.data`).

  Each task name of `data.tasks` (other than `recon`) finds its source, in this order: `sources[name]`;
  the TFDS dataset `data.tfds_names.get(name, name)` built under `data.data_dir`; for a RULER task name
  (`ruler.TASKS`, e.g. `niah_single_2`, `qa_1`), `data.ruler_samples` samples generated in memory at
  `data.ruler_max_seq_length` decoder tokens (default: `fit_ruler_length`, the longest whose contexts
  fill at most max_chunks chunks) by `ruler_source`. Optional `data` keys: `templates` (task → template
  name or literal), `recon_sources`, `chunk_overlap`, `overlong_policy`, `chat_template`,
  `system_prompt`, `num_threads`.
  """
  data = config.data
  get = lambda name, default: data[name] if name in data and data[name] is not None else default  # pylint: disable=unnecessary-lambda-assignment
  example_encoder = make_example_encoder(config, encoder_tokenizer, decoder_tokenizer)
  weights = dict(data.tasks)
  recon_sources = list(get("recon_sources", []))
  tfds_names = dict(get("tfds_names", {}))
  templates = dict(get("templates", {}))
  resolved = dict(sources or {})
  jsonl_files = dict(get("jsonl_files", {}))
  for name in [n for n in list(weights) + recon_sources if n != RECON and n not in resolved]:
    data_dir = get("data_dir", None)
    tfds_error = None
    if name in jsonl_files:
      resolved[name] = jsonl_source(name, jsonl_files[name], data_dir,
                                    bool(get("skip_bad_lines", False)))
      continue
    if data_dir is not None:
      try:
        resolved[name] = tfds_source(tfds_names.get(name, name), data_dir)
        continue
      except DatasetNotBuiltError as error:
        tfds_error = error
    if _is_ruler_task(name):
      max_seq_length = get("ruler_max_seq_length", None)
      if max_seq_length is None:
        max_seq_length = fit_ruler_length(name, example_encoder.chunker, data.max_chunks,
                                          decoder_tokenizer, int(config.seed))
      resolved[name] = ruler_source(
          name, max_seq_length=int(max_seq_length), num_samples=int(get("ruler_samples", 256)),
          seed=int(config.seed), tokenizer=decoder_tokenizer)
      continue
    if tfds_error is not None:
      raise tfds_error
    raise errors.DataError(f"data.tasks names {name!r}, which is neither passed in memory, nor a RULER "
                           "task, nor findable: set data.data_dir to the folder its TFDS dataset was "
                           "built in, or name its JSONL files in data.jsonl_files")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  return Pipeline(resolved, weights, example_encoder, global_batch_size=int(config.train.batch_size),
                  seed=int(config.seed), process_index=process_index, process_count=process_count,
                  templates=templates, recon_sources=recon_sources or None,
                  num_threads=int(get("num_threads", 0)), start_step=start_step)
