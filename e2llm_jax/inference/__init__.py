"""Inference: a trained E2LLM that compresses a context once and answers many questions about it.

`E2LLM` (the engine: from_workdir / from_state, compress, generate, generate_text) and `SoftContext`.
"""

from e2llm_jax.inference.engine import E2LLM
from e2llm_jax.inference.soft_context import SoftContext

__all__ = ["E2LLM", "SoftContext"]
