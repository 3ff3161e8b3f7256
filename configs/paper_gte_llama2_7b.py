"""The paper's main setting: GTE-large encoder + Llama-2-7B-chat decoder, from local HF folders.

Run with `--config=configs/paper_gte_llama2_7b.py:encoder=GTE_DIR,decoder=DIR` (both local folders).
"""

from e2llm_jax import config_utils


def get_config(arg=None):
  c = config_utils.paper_recipe(arg)
  # Llama-2 reads 4096 positions: 256 soft tokens (~25K context tokens) + prompt, query and
  # answer fit with room to spare (chosen).
  c.data.max_chunks = 256
  return c
