"""TFDS builders (array_record, no TensorFlow) and the record layouts the pipeline reads.

`long_qa` and `jsonl` write the normalised `{id, context, prompt, answer, answers, source}`;
`ruler_synthetic` keeps RULER's own layout; `decode_record` reads both, so the pipeline can mix them.

TFDS without TensorFlow (see ENVIRONMENT.md §2): build with `file_format="array_record"` and read with
`tfds.data_source` / `builder.as_data_source` (random access); `tfds.load` and `as_dataset` need
TensorFlow. Records come back in hashed-key order, and text comes back as bytes: `decode_record` turns
a stored record back into str fields.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

FILE_FORMAT = "array_record"
TEXT_FIELDS = ("id", "context", "prompt", "answer", "source")


def normalized_features() -> Any:
  """The TFDS FeaturesDict of a normalised record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  text = tfds.features.Text()
  return tfds.features.FeaturesDict({
      "id": text, "context": text, "prompt": text, "answer": text,
      "answers": tfds.features.Sequence(tfds.features.Text()), "source": text,
  })


def normalized_record(*, id: str, context: str, prompt: str, answer: str,  # pylint: disable=redefined-builtin
                      answers: list[str] | None = None, source: str) -> dict[str, Any]:
  """A record in the shared layout; `answers` (every accepted answer) defaults to `[answer]`."""
  answers = [answer] if answers is None else [str(a) for a in answers]
  return {"id": str(id), "context": str(context), "prompt": str(prompt), "answer": str(answer),
          "answers": answers, "source": str(source)}


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any], require_answer: bool = True) -> dict[str, Any]:
  """A record read from TFDS (bytes, numpy arrays) or from memory, as str fields and a list.

  Two layouts are read: the normalised one (`context` required, and `answer` or a non-empty `answers`
  unless `require_answer` is False; `prompt`, `id` and `source` may be absent), and RULER's
  (`input, outputs, answer_prefix, context_start, context_end`, as `ruler.generate` and the
  `ruler_synthetic` builder write it). The result always has the normalised fields plus `preamble`: the
  text the decoder reads before the context that the record itself carries (RULER's instruction before
  its haystack; "" for the normalised layout, whose prompt template supplies it).
  """
  if all(name in record for name in RULER_FIELDS):
    return _decode_ruler(record)
  if "context" not in record:
    raise KeyError(f"record has no 'context' (fields: {sorted(record)})")
  decoded = {name: _text(record[name]) if name in record else "" for name in TEXT_FIELDS}
  decoded["answers"] = _texts(record.get("answers", [record["answer"]] if "answer" in record else []))
  if "answer" not in record and decoded["answers"]:
    decoded["answer"] = decoded["answers"][0]
  if require_answer and "answer" not in record and not decoded["answers"]:
    raise KeyError(f"record has neither 'answer' nor 'answers' (fields: {sorted(record)})")
  decoded["preamble"] = ""
  return decoded


RULER_FIELDS = ("input", "outputs", "answer_prefix", "context_start", "context_end")
RULER_ANY_OUTPUT_TASK_PREFIX = "qa"  # qa_1, qa_2


def _texts(values: Any) -> list[str]:
  if isinstance(values, (str, bytes)):
    values = [values]
  return [_text(v) for v in (values.tolist() if isinstance(values, np.ndarray) else values)]


def _decode_ruler(record: Mapping[str, Any]) -> dict[str, Any]:
  """RULER's `input` is preamble ‖ context ‖ question; the model then reads `answer_prefix`."""
  text = _text(record["input"])
  start, end = int(record["context_start"]), int(record["context_end"])
  outputs = _texts(record["outputs"])
  task = _text(record.get("task", "ruler"))
  # RULER scores its qa tasks by any one output (string_match_part: outputs are alternative answers)
  # and every other task by all of them (string_match_all), so the target is one or all of them.
  answer = outputs[0] if task.startswith(RULER_ANY_OUTPUT_TASK_PREFIX) else ", ".join(outputs)
  return {"id": f"{task}:{int(record.get('index', 0))}", "context": text[start:end],
          "prompt": text[end:] + _text(record["answer_prefix"]), "answer": answer,
          "answers": outputs, "source": task, "preamble": text[:start]}
