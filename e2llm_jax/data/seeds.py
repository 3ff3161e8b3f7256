"""Named random streams: each purpose (train split, validation split, held-out evaluation) and task has its own.

A stream is `np.random.SeedSequence([seed, purpose id, task id])`, so no two purposes share samples whatever seeds a user picks.
"""

from __future__ import annotations

import zlib

import numpy as np

TRAIN = "train"
VALIDATION = "validation"
EVALUATION = "evaluation"  # held-out evaluation of a run (training loop, eval.py)
# Fixed forever: changing an id changes every sample drawn for that purpose.
PURPOSE_IDS = {TRAIN: 1, VALIDATION: 2, EVALUATION: 3}
_UINT64 = (1 << 64) - 1


def task_id(name: str) -> int:
  """A stable id of a task name (crc32: the same in every process and Python version)."""
  return zlib.crc32(name.encode("utf-8"))


def stream(seed: int, purpose: str, task: str = "") -> np.random.SeedSequence:
  """The SeedSequence of `purpose` (one of PURPOSE_IDS) for `task` under the run's `seed`."""
  if purpose not in PURPOSE_IDS:
    raise ValueError(f"unknown random-stream purpose {purpose!r}; use one of {sorted(PURPOSE_IDS)}.")
  # A negative seed maps to its two's-complement: distinct seeds stay distinct.
  return np.random.SeedSequence([int(seed) & _UINT64, PURPOSE_IDS[purpose], task_id(task)])


def stream_seed(seed: int, purpose: str, task: str = "") -> int:
  """A 63-bit int drawn from `stream(...)`, for generators that take an int seed (`data.ruler.generate`)."""
  low, high = stream(seed, purpose, task).generate_state(2, np.uint32)
  return (int(high) << 32 | int(low)) >> 1
