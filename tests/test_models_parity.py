"""Float32 parity of the towers against transformers PyTorch on the same random weights.

Also: KV-cache decoding, padding invariance, pooling references, and LoRA identities.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from e2llm_jax import hf  # noqa: E402
from e2llm_jax.models import bert, lora, llama  # noqa: E402

TOL = 1e-4


def _save(model, path):
  model.save_pretrained(path)
  return path


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _tiny_bert_model():
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64)
  return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  model = _tiny_bert_model()
  path = _save(model, tmp_path_factory.mktemp("bert"))
  cfg, params = hf.load_encoder(path)
  ids = np.random.RandomState(0).randint(1, 128, (3, 20))
  mask = np.ones_like(ids)
  mask[1, 12:] = 0
  mask[2, 5:] = 0
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  return cfg, params, ids, mask, ref


def test_bert_hidden_states_match_torch(tiny_bert):
  cfg, params, ids, mask, ref = tiny_bert
  out = bert.encode(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
  real = mask.astype(bool)
  assert _max_diff(np.asarray(out)[real], ref[real]) <= TOL


def _torch_pooling_reference(kind, hidden, mask, pool_params, num_heads):
  hidden_t, mask_t = torch.tensor(hidden), torch.tensor(mask, dtype=torch.float32)
  if kind == "cls":
    return hidden[:, :1]
  if kind == "mean":
    summed = (hidden_t * mask_t[..., None]).sum(1, keepdim=True)
    return (summed / mask_t.sum(1, keepdim=True)[..., None]).numpy()
  p = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), pool_params)
  width = hidden.shape[-1]
  mha = torch.nn.MultiheadAttention(width, num_heads, batch_first=True)
  with torch.no_grad():
    mha.in_proj_weight.copy_(torch.cat([p[n]["kernel"].T for n in ("query", "key", "value")]))
    mha.in_proj_bias.copy_(torch.cat([p[n]["bias"] for n in ("query", "key", "value")]))
    mha.out_proj.weight.copy_(p["attention_output"]["kernel"].T)
    mha.out_proj.bias.copy_(p["attention_output"]["bias"])
    seeds = p["seeds"][None].expand(hidden.shape[0], -1, -1)
    attn, _ = mha(seeds, hidden_t, hidden_t, key_padding_mask=mask_t == 0)
    norm = lambda x, n: torch.nn.functional.layer_norm(x, (width,), p[n]["scale"], p[n]["bias"],
                                                        1e-5)
    h = norm(seeds + attn, "attention_norm")
    ffn = torch.nn.functional.gelu(h @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"])
    ffn = ffn @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]
    return norm(h + ffn, "output_norm").numpy()


@pytest.mark.parametrize("kind,num_tokens", [("cls", 1), ("mean", 1), ("pma", 1), ("pma", 3)])
def test_pooling_matches_reference_from_torch_hidden_states(tiny_bert, kind, num_tokens):
  cfg, params, ids, mask, ref_hidden = tiny_bert
  pooling = bert.Pooling(kind, cfg.hidden_size, num_tokens=num_tokens, num_heads=4)
  hidden = jnp.asarray(ref_hidden)
  variables = pooling.init(jax.random.key(1), hidden, jnp.asarray(mask))
  pooled = pooling.apply(variables, hidden, jnp.asarray(mask))
  assert pooled.shape == (ids.shape[0], num_tokens, cfg.hidden_size)
  pool_params = jax.tree.map(np.asarray, nn.meta.unbox(variables.get("params", {})))
  ref = _torch_pooling_reference(kind, ref_hidden, mask, pool_params, 4)
  assert _max_diff(pooled, ref) <= TOL


def _llama_family(kind, **overrides):
  common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256)
  if kind == "qwen2":
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_key_value_heads=2, tie_word_embeddings=False, **common, **overrides))
  if kind == "mistral":
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=16, **common,
        **overrides))
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **overrides))


ROPE_LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}

DECODER_CASES = {
    "llama_mha_untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_gqa_rope_linear": ("llama", dict(num_key_value_heads=2, rope_parameters=ROPE_LINEAR)),
    "llama_gqa_rope_llama3": ("llama", dict(num_key_value_heads=2, rope_parameters=ROPE_LLAMA3)),
    "llama_attention_bias": ("llama", dict(num_key_value_heads=2, attention_bias=True)),
    "qwen2_qkv_bias": ("qwen2", {}),
    "mistral_sliding_window": ("mistral", {}),
}


@pytest.fixture(scope="module", params=sorted(DECODER_CASES))
def tiny_decoder(request, tmp_path_factory):
  kind, overrides = DECODER_CASES[request.param]
  torch.manual_seed(0)
  model = _llama_family(kind, **overrides).eval()
  if kind in ("qwen2", "llama") and overrides.get("attention_bias", kind == "qwen2"):
    with torch.no_grad():  # HF initialises biases to zero; make them matter
      for name, param in model.named_parameters():
        if name.endswith("bias"):
          param.normal_(0, 0.5)
  path = _save(model, tmp_path_factory.mktemp(request.param))
  cfg, params = hf.load_decoder(path)
  return request.param, model, cfg, params


def test_decoder_logits_and_hidden_states_match_torch(tiny_decoder):
  name, model, cfg, params = tiny_decoder
  ids = np.random.RandomState(0).randint(0, 128, (2, 40))
  with torch.no_grad():
    out = model(torch.tensor(ids), output_hidden_states=True)
  logits = llama.decoder_logits(cfg, params, jnp.asarray(ids))
  hidden = llama.decoder_forward(cfg, params, input_ids=jnp.asarray(ids), return_hidden=True)
  assert _max_diff(logits, out.logits.numpy()) <= TOL, name
  assert _max_diff(hidden, out.hidden_states[-1].numpy()) <= TOL, name


def test_inputs_embeds_equal_input_ids(tiny_decoder):
  _, _, cfg, params = tiny_decoder
  ids = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 12)))
  embeds = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)
  np.testing.assert_allclose(llama.decoder_logits(cfg, params, inputs_embeds=embeds),
                             llama.decoder_logits(cfg, params, input_ids=ids), atol=1e-6)


def test_kv_cache_decoding_equals_full_forward(tiny_decoder):
  name, _, cfg, params = tiny_decoder
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 24)))
  full = llama.decoder_logits(cfg, params, ids)
  step = jax.jit(lambda p, c, t: llama.decoder_step(cfg, p, c, input_ids=t))
  cache = llama.init_cache(cfg, batch=2, max_length=32)
  logits, cache = step(params, cache, ids[:, :8])  # prefill
  pieces = [logits]
  for t in range(8, 24):
    logits, cache = step(params, cache, ids[:, t:t + 1])
    pieces.append(logits)
  assert _max_diff(jnp.concatenate(pieces, axis=1), full) <= TOL, name


def test_padding_left_right_none_give_same_logits(tiny_decoder):
  name, _, cfg, params = tiny_decoder
  seq = np.random.RandomState(3).randint(1, 128, 10)
  pad = 5
  none = llama.decoder_logits(cfg, params, jnp.asarray(seq[None]))[0]
  left_ids = np.concatenate([np.zeros(pad, int), seq])[None]
  left_mask = np.concatenate([np.zeros(pad, int), np.ones(10, int)])[None]
  left = llama.decoder_logits(cfg, params, jnp.asarray(left_ids), attention_mask=left_mask)[0]
  right_ids, right_mask = left_ids[:, ::-1].copy(), left_mask[:, ::-1].copy()
  right_ids[0, :10] = seq
  right = llama.decoder_logits(cfg, params, jnp.asarray(right_ids), attention_mask=right_mask)[0]
  assert _max_diff(left[pad:], none) <= TOL, name
  assert _max_diff(right[:10], none) <= TOL, name


def test_left_padded_cache_decoding_matches_unpadded(tiny_decoder):
  _, _, cfg, params = tiny_decoder
  seq = jnp.asarray(np.random.RandomState(4).randint(1, 128, (1, 9)))
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq[:, :6]], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
  cache = llama.init_cache(cfg, 1, 16)
  _, cache = llama.decoder_step(cfg, params, cache, input_ids=padded, attention_mask=mask)
  logits, _ = llama.decoder_step(cfg, params, cache, input_ids=seq[:, 6:])
  full = llama.decoder_logits(cfg, params, seq)
  assert _max_diff(logits, full[:, 6:]) <= TOL


def test_lora_with_zero_b_equals_base_and_merge_equals_unmerged(tiny_decoder):
  _, _, cfg, params = tiny_decoder
  ids = jnp.asarray(np.random.RandomState(5).randint(0, 128, (2, 16)))
  config = lora.LoRAConfig(rank=4, alpha=8.0, targets="q_proj|k_proj|v_proj|o_proj|gate_proj")
  fresh = lora.init(jax.random.key(0), params, config)
  base = llama.decoder_logits(cfg, params, ids)
  with_zero_b = llama.decoder_logits(cfg, params, ids, lora=lora.scaled(fresh, config.scale))
  np.testing.assert_array_equal(np.asarray(with_zero_b), np.asarray(base))
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         fresh)
  unmerged = llama.decoder_logits(cfg, params, ids, lora=lora.scaled(trained, config.scale))
  merged = llama.decoder_logits(cfg, lora.merge(params, trained, config.scale), ids)
  assert _max_diff(unmerged, base) > 1e-3  # the adapters do change the model
  assert _max_diff(unmerged, merged) <= 1e-5


def test_encoder_lora_zero_b_and_merge(tiny_bert):
  cfg, params, ids, mask, _ = tiny_bert
  config = lora.LoRAConfig(rank=4, alpha=4.0, targets=r"query|key|value")
  fresh = lora.init(jax.random.key(0), params, config)
  base = bert.encode(cfg, params, ids, mask)
  np.testing.assert_array_equal(
      np.asarray(bert.encode(cfg, params, ids, mask, lora=lora.scaled(fresh, config.scale))),
      np.asarray(base))
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                         fresh)
  unmerged = bert.encode(cfg, params, ids, mask, lora=lora.scaled(trained, config.scale))
  merged = bert.encode(cfg, lora.merge(params, trained, config.scale), ids, mask)
  assert _max_diff(unmerged, merged) <= 1e-5


def test_encoder_mlp_gradients_match_torch(tiny_bert):
  """GELU's hand-written backward (layers.gelu_exact): MLP kernel gradients against torch autograd
  on the same weights."""
  cfg, params, ids, mask, _ = tiny_bert
  weights = np.random.RandomState(3).normal(size=(*ids.shape, cfg.hidden_size)).astype(np.float32)
  weights *= mask[..., None]
  grads = jax.grad(lambda p: jnp.sum(bert.encode(cfg, p, ids, mask) * weights))(params)["layer"]
  ref = _tiny_bert_model()  # the fixture's weights: same seed and config
  ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.mul(
      torch.tensor(weights)).sum().backward()
  for i, layer in enumerate(ref.encoder.layer):
    for ours, theirs in (("intermediate", layer.intermediate.dense), ("output", layer.output.dense)):
      assert _max_diff(grads[ours]["kernel"][i], theirs.weight.grad.numpy().T) <= TOL, (ours, i)


def test_rope_backward_is_the_rotation_back(tiny_decoder):
  """apply_rope's hand-written backward against autodiff of the same rotation."""
  _, _, cfg, _ = tiny_decoder
  positions = jnp.asarray(np.random.RandomState(6).randint(0, 50, (2, 7)))
  cos, sin = llama.rope_cos_sin(cfg, positions)
  x = jax.random.normal(jax.random.key(7), (2, 7, 3, cfg.head_dim))
  weights = jax.random.normal(jax.random.key(8), x.shape)
  grad = lambda fn: jax.grad(lambda x: jnp.sum(fn(x, cos, sin) * weights))(x)
  np.testing.assert_allclose(grad(llama.apply_rope), grad(llama._rotate_half_rope),
                             atol=1e-6, rtol=1e-6)


def test_decoder_mlp_gradients_match_torch(tiny_decoder):
  """SiLU's hand-written backward (layers.silu), the same way."""
  name, model, cfg, params = tiny_decoder
  ids = np.random.RandomState(4).randint(0, 128, (2, 24))
  weights = np.random.RandomState(5).normal(size=(2, 24, cfg.hidden_size)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.sum(llama.decoder_forward(
      cfg, p, input_ids=jnp.asarray(ids), return_hidden=True) * weights))(params)
  model.zero_grad()
  model(torch.tensor(ids), output_hidden_states=True).hidden_states[-1].mul(
      torch.tensor(weights)).sum().backward()
  for i, layer in enumerate(model.model.layers):
    for ours, theirs in (("gate_proj", layer.mlp.gate_proj), ("up_proj", layer.mlp.up_proj)):
      assert _max_diff(grads["layers"]["mlp"][ours]["kernel"][i],
                       theirs.weight.grad.numpy().T) <= TOL, (name, ours, i)
