"""Huge pages for XLA:CPU's buffers: when the environment asks glibc for them, and the restart.

The restart runs in a child process of its own (it replaces the process it runs in).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from e2llm_jax import host_memory

ON = "glibc.malloc.hugetlb=1"


@pytest.fixture
def capable(monkeypatch):
  """A glibc 2.35+ Linux whose kernel gives huge pages on request only (THP "madvise")."""
  monkeypatch.setattr(host_memory, "_glibc_supports_hugetlb", lambda: True)
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")


def test_asks_for_huge_pages_only_where_they_need_asking(capable, monkeypatch):
  assert host_memory.huge_page_env("float32", {}) == {"GLIBC_TUNABLES": ON}
  assert host_memory.huge_page_env("bfloat16", {}) == {"GLIBC_TUNABLES": ON}
  assert host_memory.huge_page_env("float16", {}) == {}  # never measured
  # Other tunables stay; one the user set either way wins.
  assert host_memory.huge_page_env("float32", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + ON}
  assert host_memory.huge_page_env("float32", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {}
  for mode in ("always", "never", None):  # the kernel does it already, or cannot
    monkeypatch.setattr(host_memory, "_thp_mode", lambda mode=mode: mode)
    assert host_memory.huge_page_env("float32", {}) == {}
  monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory, "_glibc_supports_hugetlb", lambda: False)
  assert host_memory.huge_page_env("float32", {}) == {}


def test_reads_the_kernels_mode(tmp_path, monkeypatch):
  mode_file = tmp_path / "enabled"
  monkeypatch.setattr(host_memory, "_THP_MODE", mode_file)
  assert host_memory._thp_mode() is None
  mode_file.write_text("always [madvise] never\n")
  assert host_memory._thp_mode() == "madvise"
  mode_file.write_text("[always] madvise never\n")
  assert host_memory._thp_mode() == "always"


def test_restart_keeps_the_command_line_and_happens_once(tmp_path):
  script = tmp_path / "command.py"
  script.write_text(textwrap.dedent("""
      import json, os, sys
      from e2llm_jax import host_memory
      host_memory._glibc_supports_hugetlb = lambda: True
      host_memory._thp_mode = lambda: "madvise"
      print("start", flush=True)
      host_memory.restart_with_huge_pages("float32")
      print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES")}))
      """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  done = subprocess.run([sys.executable, str(script), "--config.a=1", "two words"], env=env,
                        capture_output=True, text=True, check=True, timeout=120)
  lines = done.stdout.splitlines()
  assert lines[:2] == ["start", "start"] and len(lines) == 3, done.stdout  # restarted once
  assert json.loads(lines[2]) == {"argv": ["--config.a=1", "two words"], "tunables": ON}
