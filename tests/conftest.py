"""Test session set-up: 8 fake CPU devices (set before JAX is imported) and shared fixtures.

Every test builds its own tiny random models; nothing is downloaded.
"""

import atexit
import os
import shutil
import tempfile

# XLA's LLVM backend at -O0: tests compile hundreds of small programs and run each a few times, so
# compiling 35% faster wins although a tiny step then runs about 3x slower (suite 1104 s -> 867 s on
# 2 cores). The subprocess tests inherit these flags; test_learns, which runs 2000 steps, compiles its
# step at XLA's default level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
# Many tests (and the CLIs they start) compile the same tiny train and eval steps: one persistent
# compilation cache for the session, in and out of process, compiles each once. Fresh every session.
# The test workers (pytest-xdist) start after this runs here, so they share the folder too. Every
# program is kept, not only the slow ones: most of a tiny run's compile time is hundreds of small
# programs (Orbax's slices when it saves, initialisers), each quick, together tens of seconds.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="e2llm_jax_test_compile_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# train.py restarts itself once to ask glibc for huge pages (host_memory.py): a second start of
# Python and the config per launch, ~80 s over the suite's tiny runs, for steps too small to gain.
# Its own tests (test_host_memory.py) clear this.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs two workers, each taking a whole file at a time in this order (then collection
# order): the longest files first, so that no long file starts last and ends the run alone.
LONGEST_FILES_FIRST = ("test_training.py", "test_kill_resume.py", "test_learns.py",
                       "test_inference.py", "test_attention.py", "test_models_parity.py",
                       "test_evaluation.py", "test_hf_export.py", "test_real_weights.py",
                       "test_bad_inputs.py", "test_layer_stacking.py", "test_loop_overlap.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
