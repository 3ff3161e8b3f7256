"""Hugging Face interop: HF folders and GGUF files into our towers, and exports back out to HF and PEFT.

`load_encoder`, `load_decoder` and `load_tokenizer` are the stable entry points (DESIGN §4); exports are
written by `python -m e2llm_jax.hf.export` and read back by `hf.bundle.load_export`.
"""

from e2llm_jax.hf.configs import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    encoder_config_from_hf,
    encoder_config_to_hf,
)
from e2llm_jax.hf.loading import load_decoder, load_encoder
from e2llm_jax.hf.tokenizers import load_tokenizer
from e2llm_jax.hf.weight_names import (
    decoder_to_hf_state_dict,
    encoder_to_hf_state_dict,
    to_hf_state_dict,
)

__all__ = [
    "load_encoder", "load_decoder", "load_tokenizer",
    "encoder_config_from_hf", "encoder_config_to_hf", "decoder_config_from_hf",
    "decoder_config_to_hf", "to_hf_state_dict", "encoder_to_hf_state_dict",
    "decoder_to_hf_state_dict",
]
