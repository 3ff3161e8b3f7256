"""GTE-large encoder + Qwen2.5-7B-Instruct decoder (the LongBench v2 setting), local HF folders.

Run with `--config=configs/paper_gte_qwen25_7b.py:encoder=GTE_DIR,decoder=DIR` (both local folders).
"""

from e2llm_jax import config_utils


def get_config(arg=None):
  c = config_utils.paper_recipe(arg)
  # Qwen2.5 reads 32K positions; 512 soft tokens cover ~50K context tokens (chosen).
  c.data.max_chunks = 512
  return c
