"""E2LLM in JAX: long contexts compressed by a chunk encoder into soft tokens for a decoder LLM.

Subpackages: models (pure towers), hf (Hugging Face import/export), data, training, evaluation.
"""

__version__ = "0.1.0"
