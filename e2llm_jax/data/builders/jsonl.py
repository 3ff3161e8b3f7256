"""TFDS builder `jsonl`: user JSONL files (LongBench v1/v2, SCROLLS-like, plain) as normalised records.

The layout is detected per file from its first well-formed line; a malformed line names its file and line.

Layouts (required fields; anything else on a line is ignored):
- `longbench_v2`: `context, question, choice_A, choice_B, choice_C, choice_D, answer` (a letter A-D).
  prompt = the question and the four choices; answer = the letter (use the `multiple_choice` template,
  whose target is "The correct answer is (X).").
- `longbench_v1`: `context, input, answers` (a non-empty list of strings). prompt = input,
  answer = answers[0].
- `plain`: `context, prompt, answer` (optionally `answers`).
- `scrolls`: `input, output` (no `context`): context = input, prompt = "", answer = output (SCROLLS puts
  any query inside `input`).
`id` comes from `_id` or `id` when present, else `<file stem>:<line>`; `source` is the file stem.

Usage: `builder, stats = build(["a.jsonl", ...], data_dir, name="mydata")`, then read with
`read(data_dir, "jsonl/mydata")` (or `e2llm_jax.data.pipeline.tfds_source`). With
`skip_bad_lines=True` a malformed line is skipped and counted instead of stopping the build; the counts
are in the returned `JsonlStats` and in the dataset's metadata (`builder.info.metadata`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from e2llm_jax import errors
from e2llm_jax.data import builders

LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "longbench_v2": ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer"),
    "longbench_v1": ("context", "input", "answers"),
    "plain": ("context", "prompt", "answer"),
    "scrolls": ("input", "output"),
}
CHOICE_LETTERS = ("A", "B", "C", "D")
MAX_REPORTED_BAD_LINES = 100


# The config key that names a task's JSONL files (error messages point users at it).
FILES_KEY = "data.jsonl_files"


class BadLineError(errors.DataError):
  """A JSONL line that cannot be read as a record of its file's layout."""


def detect_layout(record: dict[str, Any]) -> str | None:
  """The first layout (in LAYOUT_FIELDS order) whose fields the record has, or None."""
  for layout, fields in LAYOUT_FIELDS.items():
    if all(name in record for name in fields):
      return layout
  return None


def _string(record: dict[str, Any], name: str) -> str:
  value = record[name]
  if not isinstance(value, str):
    raise BadLineError(f"field {name!r} must be a string, got {type(value).__name__}")
  return value


def _string_list(record: dict[str, Any], name: str) -> list[str]:
  value = record[name]
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
    raise BadLineError(f"field {name!r} must be a non-empty list of strings, got {value!r:.80}")
  return value


def normalize(record: dict[str, Any], layout: str, default_id: str, source: str) -> dict[str, Any]:
  """One JSON object of `layout` as a normalised record; BadLineError says what is wrong."""
  missing = [name for name in LAYOUT_FIELDS[layout] if name not in record]
  if missing:
    raise BadLineError(f"missing field(s) {missing} of the {layout} layout")
  record_id = str(record.get("_id", record.get("id", default_id)))
  if layout == "longbench_v2":
    letter = _string(record, "answer").strip().strip("()").upper()
    if letter not in CHOICE_LETTERS:
      raise BadLineError(f"field 'answer' must be one of {CHOICE_LETTERS}, got {record['answer']!r}")
    choices = "\n".join(f"({letter_}) {_string(record, 'choice_' + letter_)}"
                        for letter_ in CHOICE_LETTERS)
    prompt = f"Question: {_string(record, 'question')}\nChoices:\n{choices}"
    return builders.normalized_record(id=record_id, context=_string(record, "context"), prompt=prompt,
                                      answer=letter, answers=[letter], source=source)
  if layout == "longbench_v1":
    answers = _string_list(record, "answers")
    return builders.normalized_record(id=record_id, context=_string(record, "context"),
                                      prompt=_string(record, "input"), answer=answers[0],
                                      answers=answers, source=source)
  if layout == "plain":
    answer = _string(record, "answer")
    answers = _string_list(record, "answers") if "answers" in record else [answer]
    return builders.normalized_record(id=record_id, context=_string(record, "context"),
                                      prompt=_string(record, "prompt"), answer=answer,
                                      answers=answers, source=source)
  answers = _string_list(record, "output")
  return builders.normalized_record(id=record_id, context=_string(record, "input"), prompt="",
                                    answer=answers[0], answers=answers, source=source)


@dataclasses.dataclass
class JsonlStats:
  """What a build read: records and layout per file, and the skipped lines (file, line, reason)."""
  records: dict[str, int] = dataclasses.field(default_factory=dict)
  layouts: dict[str, str] = dataclasses.field(default_factory=dict)
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  bad_lines: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_metadata(self) -> dict[str, Any]:
    return {"records": self.records, "layouts": self.layouts, "skipped": self.skipped,
            "num_skipped": self.num_skipped, "bad_lines": self.bad_lines[:MAX_REPORTED_BAD_LINES]}


def read_jsonl(path: str | pathlib.Path, stats: JsonlStats, skip_bad_lines: bool = False
               ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, normalised record) for every good line of one file; bad lines raise or count."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.DataError(f"JSONL file {path} does not exist; check {FILES_KEY}")
  name = str(path)
  layout, layout_line = None, 0
  stats.records.setdefault(name, 0)
  stats.skipped.setdefault(name, 0)
  with path.open("rb") as lines:  # bytes: a bad encoding is one bad line, not a lost file
    for line_number, raw in enumerate(lines, start=1):
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
          raise BadLineError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte "
                             f"{error.start + 1}); re-save the file as UTF-8") from None
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise BadLineError(f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
          raise BadLineError(f"a line must hold a JSON object, got {type(record).__name__}")
        if layout is None:
          layout = detect_layout(record)
          if layout is None:
            raise BadLineError(f"fields {sorted(record)[:12]} match no layout; expected one of "
                               + "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUT_FIELDS.items()))
          layout_line = line_number
          stats.layouts[name] = layout
        normalized = normalize(record, layout, f"{path.stem}:{line_number}", path.stem)
        if not normalized["context"].strip():
          raise BadLineError("the context is empty or only whitespace; give the text to compress")
      except BadLineError as error:
        where = f"{name}, line {line_number}"
        if layout is not None and layout_line != line_number:
          where += f" (layout {layout}, detected from line {layout_line})"
        if not skip_bad_lines:
          raise BadLineError(f"{where}: {error}. Fix the line, or set data.skip_bad_lines=True "
                             "(build(..., skip_bad_lines=True)) to skip and count such lines."
                             ) from None
        stats.skipped[name] += 1
        stats.bad_lines.append(f"{where}: {error}")
        continue
      stats.records[name] += 1
      yield line_number, normalized
  if not stats.records[name]:
    skipped = stats.skipped[name]
    raise errors.DataError(
        f"JSONL file {path} holds no records" + (f" ({skipped} bad lines were skipped)" if skipped
                                                 else " (it is empty or blank)")
        + f"; give it one JSON object per line, or remove it from {FILES_KEY}")


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
  """Which files a `jsonl/<name>` dataset holds."""
  paths: tuple[str, ...] = ()
  skip_bad_lines: bool = False


class Jsonl(tfds.core.GeneratorBasedBuilder):
  """User JSONL files in the LongBench / SCROLLS / plain layouts, normalised; one `train` split."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIG_CLASS = JsonlConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=builders.normalized_features(),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self.builder_config.paths:
      raise ValueError("the jsonl builder needs files: build(paths, data_dir, name).")
    self.stats = JsonlStats()
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for file_index, path in enumerate(self.builder_config.paths):
      for line_number, record in read_jsonl(path, self.stats, self.builder_config.skip_bad_lines):
        yield f"{file_index}:{line_number}", record
    self.info.metadata.update(self.stats.as_metadata())


def build(paths: Sequence[str | pathlib.Path], data_dir: str | pathlib.Path, name: str = "default",
          skip_bad_lines: bool = False) -> tuple[Jsonl, JsonlStats]:
  """Builds `jsonl/<name>` under `data_dir` from `paths` (array_record); returns it and its stats."""
  config = JsonlConfig(name=name, version=Jsonl.VERSION,
                       description=f"{len(paths)} JSONL file(s)",
                       paths=tuple(str(pathlib.Path(p).resolve()) for p in paths),
                       skip_bad_lines=skip_bad_lines)
  builder = Jsonl(config=config, data_dir=str(data_dir), file_format=builders.FILE_FORMAT)
  builder.download_and_prepare()
  stats = getattr(builder, "stats", None)
  if stats is None:  # built earlier: the counts were saved with the dataset
    stats = JsonlStats(**{k: builder.info.metadata[k] for k in ("records", "layouts", "skipped",
                                                                "bad_lines")})
    if sorted(stats.records) != sorted(config.paths):
      raise ValueError(f"jsonl/{name} under {data_dir} was built from {sorted(stats.records)}, not "
                       f"{sorted(config.paths)}; choose another name or delete "
                       f"{builder.data_dir} to rebuild.")
  return builder, stats
