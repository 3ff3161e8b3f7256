"""Pooling `tokens` (one soft token per text token), digits split for the encoder, and the adapter's
least-squares warm start: masks, alignment, the exact linear adapter, and a run that uses all three.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from e2llm_jax import assets, hf, sharding
from e2llm_jax.data import chunking
from e2llm_jax.inference import E2LLM
from e2llm_jax.models import e2llm
from e2llm_jax.models.adapter import Adapter
from e2llm_jax.training import loop, state as state_lib, warm_start
from test_inference import document, text_run_config


def test_text_token_mask_hides_the_special_and_padding_slots():
  token_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(e2llm.text_token_mask(token_mask),
                                [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def test_linear_adapter_computes_the_fitted_map_exactly():
  rng = np.random.default_rng(0)
  weight, bias = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  params = warm_start.linear_adapter(weight, bias, hidden_size=14)
  x = rng.normal(size=(3, 6)).astype(np.float32) * 4
  out = Adapter(14, 5).apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(out, x @ weight + bias, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="adapter_hidden >= 2 x the encoder width"):
    warm_start.linear_adapter(weight, bias, hidden_size=11)


def test_each_encoder_digit_stands_for_the_same_decoder_digit():
  encoder = hf.load_tokenizer(assets.minilm_dir())
  decoder = hf.load_tokenizer(assets.smollm2_gguf())
  text = "One of the special magic numbers for knotty-gel is: 5123050."
  ids, targets = warm_start.aligned_tokens(text, encoder, decoder, 62, split_digits=True)
  pieces = encoder.convert_ids_to_tokens(ids)
  said = [decoder.decode([t]).strip().lower() for t in targets]
  digits = [(p, s) for p, s in zip(pieces, said) if p.isdigit()]
  assert [p for p, _ in digits] == list("5123050")
  assert all(p == s for p, s in digits)
  assert said[pieces.index("magic")] == "magic"
  # Without splitting, one WordPiece holds several digits and stands for its first one only.
  ids, targets = warm_start.aligned_tokens(text, encoder, decoder, 62, split_digits=False)
  assert len(ids) < len(pieces)


@pytest.fixture(scope="module")
def tokens_config(tmp_path_factory):
  config = text_run_config(tmp_path_factory.mktemp("warm_start"))
  config.model.pooling = "tokens"
  config.model.tokens_per_chunk = config.data.chunk_tokens
  config.model.adapter_hidden = 2 * 16  # twice the tiny encoder's width
  config.data.encoder_split_digits = True
  config.train.adapter_warm_start = 16
  return config


def test_warm_start_fits_token_states_to_decoder_embeddings(tokens_config):
  setup = state_lib.create_train_state(tokens_config,
                                       sharding.make_mesh((1, -1, 1), tokens_config.mesh.axes))
  data = loop.make_data(tokens_config, setup.model)
  params, report = warm_start.warm_start_adapter(setup.model, setup.frozen, data, 16)
  assert report["tokens"] > 100
  # The fit beats predicting every token's embedding by the mean embedding.
  chunker = data.encoder.chunker
  pairs = [warm_start.aligned_tokens(t, chunker.tokenizer, data.encoder.decoder_tokenizer,
                                     chunker.text_budget, True)
           for t in warm_start.chunk_texts(data, 16)]
  states = np.concatenate(list(warm_start.token_states(setup.model, setup.frozen, chunker,
                                                       [ids for ids, _ in pairs])))
  table = np.asarray(setup.frozen["decoder"]["embed_tokens"]["embedding"], np.float32)
  targets = table[np.concatenate([t for _, t in pairs])]
  fitted = np.asarray(setup.model.adapter_module().apply({"params": params}, jnp.asarray(states)))
  residual = np.mean((fitted - targets) ** 2)
  assert residual < 0.9 * np.mean((targets - targets.mean(0)) ** 2)


def test_a_tokens_run_reads_one_soft_token_per_text_token(tokens_config, tmp_path, capsys):
  loop.train(tokens_config, str(tmp_path / "run"))
  assert "adapter warm start: least squares on" in capsys.readouterr().out
  engine = E2LLM.from_workdir(tmp_path / "run")
  text = document(6) + " The code is 90417."
  context = engine.compress(text)
  chunks = engine.chunk(text)
  assert context.soft_tokens.shape[0] == len(chunks) * tokens_config.data.chunk_tokens
  # Every encoder text token (one per digit) is read once; [CLS], [SEP] and padding never.
  text_tokens, _ = chunking.tokenize_with_offsets(engine.encoder_tokenizer, text, split_digits=True)
  assert context.num_soft_tokens == len(text_tokens)
  np.testing.assert_array_equal(context.visible_soft_tokens,
                                context.soft_tokens[context.slot_mask == 1])
  assert isinstance(engine.generate("What is the code?", context, max_new_tokens=4), str)
