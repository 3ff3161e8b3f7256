"""TFDS builders (array_record, no TensorFlow) and the normalised record every builder writes.

Every builder yields `{id, context, prompt, answer, answers, source}` so the pipeline can mix them.

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

  `context` is required, and `answer` (or a non-empty `answers`) unless `require_answer` is False;
  `prompt`, `id` and `source` may be absent (empty).
  """
  if "context" not in record:
    raise KeyError(f"record has no 'context' (fields: {sorted(record)})")
  decoded = {name: _text(record[name]) if name in record else "" for name in TEXT_FIELDS}
  answers = record.get("answers", None)
  if answers is None:
    answers = [decoded["answer"]] if "answer" in record else []
  elif isinstance(answers, (str, bytes)):
    answers = [answers]
  decoded["answers"] = [_text(a) for a in (answers.tolist() if isinstance(answers, np.ndarray)
                                           else answers)]
  if "answer" not in record and decoded["answers"]:
    decoded["answer"] = decoded["answers"][0]
  if require_answer and "answer" not in record and not decoded["answers"]:
    raise KeyError(f"record has neither 'answer' nor 'answers' (fields: {sorted(record)})")
  return decoded
