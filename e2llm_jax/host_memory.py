"""Host memory for XLA:CPU: a train step's buffers in transparent huge pages.

XLA:CPU allocates a step's temporaries (2 GB for the benchmark's train step) afresh on every run,
and with 4 KB pages the kernel faults in and zeroes each page again every step; glibc's `hugetlb`
tunable asks for 2 MB pages instead: 7% off the float32 step on a 2-core Xeon at the same peak
memory, and 15% off the bfloat16 one on an EPYC since bf16 residuals are written in place
(bench/RESULTS.md, 2026-12-05 and 2026-12-06).
"""

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
HUGE_PAGE_DTYPES = ("float32", "bfloat16")
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_env(compute_dtype: str, environ=os.environ) -> dict[str, str]:
  """The environment to add so that glibc maps large allocations in huge pages; {} for a compute
  dtype they did not speed up, where that needs nothing (the kernel already does it, or cannot) or
  cannot work (no glibc 2.35+), and where the user set the tunable either way
  (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off)."""
  existing = environ.get("GLIBC_TUNABLES", "")
  if (compute_dtype not in HUGE_PAGE_DTYPES or TUNABLE in existing
      or not _glibc_supports_hugetlb() or _thp_mode() != "madvise"):
    return {}
  return {"GLIBC_TUNABLES": f"{existing}:{TUNABLE}=1" if existing else f"{TUNABLE}=1"}


def restart_with_huge_pages(compute_dtype: str) -> None:
  """Re-execute this command with `huge_page_env(compute_dtype)` when it is not empty (glibc reads
  its tunables only at start-up). Call in a command before it writes anything, never in a library
  or a test."""
  extra = huge_page_env(compute_dtype)
  if extra:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **extra})


def _glibc_supports_hugetlb() -> bool:
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    return tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def _thp_mode() -> str | None:
  """The bracketed choice of "always [madvise] never", or None where the kernel has no THP."""
  try:
    text = _THP_MODE.read_text()
  except OSError:
    return None
  return text[text.find("[") + 1:text.find("]")] if "[" in text else None
