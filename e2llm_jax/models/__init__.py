"""Pure-functional towers: params are nested dicts of arrays; no I/O lives here.

`encode` and `decoder_logits` are the stable entry points; `e2llm` composes the towers.
"""

from e2llm_jax.models.bert import EncoderConfig, encode
from e2llm_jax.models.llama import DecoderConfig, decoder_logits

__all__ = ["EncoderConfig", "DecoderConfig", "encode", "decoder_logits"]
