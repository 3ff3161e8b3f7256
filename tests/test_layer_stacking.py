"""Scanned towers: stacked params give the unrolled towers' numbers, and HF names reach either layout.

Float32, tiny random towers; the HF round trips of test_hf_import run on the (default) scanned layout.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2llm_jax import config_utils, hf, sharding
from e2llm_jax.models import bert, llama, lora, stacking

TOL = 1e-5


def _decoder(**overrides):
  sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
               num_kv_heads=2, head_dim=8, sliding_window=6)
  return llama.DecoderConfig(**{**sizes, **overrides})


def _encoder():
  return bert.EncoderConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4,
                            intermediate_size=48, max_position_embeddings=16)


def _unrolled(cfg):
  return dataclasses.replace(cfg, scan_layers=False)


def _assert_trees_close(got, want, tol=TOL):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def decoder():
  cfg = _decoder()
  params = llama.init_params(cfg, jax.random.key(0))
  config = lora.LoRAConfig(4, 8.0, "q_proj|v_proj|down_proj")
  # Non-zero b, so LoRA changes the output.
  trained = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), params, config))
  return cfg, params, config, trained


def test_scanned_tree_is_the_unrolled_tree_stacked(decoder):
  cfg, params, config, trained = decoder
  unrolled = llama.init_params(_unrolled(cfg), jax.random.key(0))
  assert set(params) == {"embed_tokens", "layers", "norm", "lm_head"}
  assert {f"layers_{i}" for i in range(3)} <= set(unrolled) and "layers" not in unrolled
  assert params["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 32, 48)
  assert trained["layers"]["self_attn"]["q_proj"]["a"].shape == (3, 32, 4)
  assert trained["layers"]["mlp"]["down_proj"]["b"].shape == (3, 4, 32)
  # per_layer and stacked invert each other, and lookup reads a per-layer path from either layout.
  per_layer = stacking.per_layer(params)
  assert set(per_layer) == set(unrolled)
  _assert_trees_close(stacking.stacked(per_layer, 3), params, 0)
  path = ("layers_2", "self_attn", "k_proj", "kernel")
  np.testing.assert_array_equal(stacking.lookup(params, path), per_layer["layers_2"]["self_attn"]
                                ["k_proj"]["kernel"])
  np.testing.assert_array_equal(stacking.lookup(per_layer, path),
                                params["layers"]["self_attn"]["k_proj"]["kernel"][2])


def test_scanned_decoder_gives_the_unrolled_logits_lora_and_cache(decoder):
  cfg, params, config, trained = decoder
  ids = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)
  mask = jnp.ones_like(ids).at[0, :3].set(0)  # left padding in one row
  scaled = lora.scaled(trained, config.scale)
  logits = jax.jit(lambda model_cfg, p, t: llama.decoder_logits(model_cfg, p, ids,
                                                                  attention_mask=mask, lora=t),
                   static_argnums=0)
  got = logits(cfg, params, scaled)
  want = logits(_unrolled(cfg), stacking.per_layer(params), stacking.per_layer(scaled))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  # LoRA changes the output, and merging it into stacked kernels gives the same logits.
  assert np.abs(got - logits(cfg, params, None)).max() > 1e-3
  merged = logits(cfg, lora.merge(params, trained, config.scale), None)
  np.testing.assert_allclose(merged, got, atol=TOL, rtol=TOL)
  # The KV cache ([layers, ...], what the scan slices per layer): prefill 7, then one at a time.
  step = jax.jit(lambda p, t, cache, i, m: llama.decoder_step(cfg, p, cache, input_ids=i,
                                                              attention_mask=m, lora=t))
  cache = llama.init_cache(cfg, 2, 16)
  out, cache = step(params, scaled, cache, ids[:, :7], mask[:, :7])
  outputs = [out]
  for t in range(7, 11):
    out, cache = step(params, scaled, cache, ids[:, t:t + 1], mask[:, t:t + 1])
    outputs.append(out)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outputs, axis=1))[real],
                             np.asarray(got)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", config_utils.REMAT_POLICIES)
def test_rematerialised_scan_gives_the_same_gradients(decoder, policy):
  cfg, params, config, trained = decoder
  ids = jax.random.randint(jax.random.key(3), (2, 9), 0, 64)

  @functools.partial(jax.jit, static_argnums=0)
  def grads(model_cfg, base, tree):
    loss = lambda t: jnp.sum(llama.decoder_logits(model_cfg, base, ids,
                                                  lora=lora.scaled(t, config.scale)) ** 2)
    return jax.grad(loss)(tree)

  want = stacking.per_layer(grads(_unrolled(cfg), stacking.per_layer(params),
                                  stacking.per_layer(trained)))
  got = grads(dataclasses.replace(cfg, remat=True, remat_policy=policy), params, trained)
  _assert_trees_close(stacking.per_layer(got), want, 1e-4)


def test_scanned_encoder_gives_the_unrolled_hidden_states_and_gradients():
  cfg = _encoder()
  params = bert.init_params(cfg, jax.random.key(4))
  assert params["layer"]["attention_norm"]["scale"].shape == (3, 32)
  config = lora.LoRAConfig(4, 8.0, "query|value|intermediate")
  trained = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(5), params, config))
  ids = jax.random.randint(jax.random.key(6), (3, 16), 1, 50)
  mask = jnp.ones_like(ids).at[:, 10:].set(0)

  @functools.partial(jax.jit, static_argnums=0)
  def run(model_cfg, base, tree):
    encode = lambda t: bert.encode(model_cfg, base, ids, mask, lora=lora.scaled(t, config.scale))
    return encode(tree), jax.grad(lambda t: jnp.sum(encode(t) ** 2))(tree)

  hidden, grads = run(dataclasses.replace(cfg, remat=True), params, trained)
  want_hidden, want_grads = run(_unrolled(cfg), stacking.per_layer(params),
                                stacking.per_layer(trained))
  np.testing.assert_allclose(hidden, want_hidden, atol=TOL, rtol=TOL)
  _assert_trees_close(stacking.per_layer(grads), want_grads, 1e-4)


def test_depth_does_not_grow_the_scanned_program():
  # What makes compile time flat in depth: the scanned step holds one layer whatever num_layers is.
  ids = jnp.zeros((1, 8), jnp.int32)

  def equations(cfg):
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    return len(jax.make_jaxpr(lambda p: llama.decoder_logits(cfg, p, ids))(params).eqns)

  assert equations(_decoder(num_layers=2)) == equations(_decoder(num_layers=8))
  assert equations(_unrolled(_decoder(num_layers=8))) > 3 * equations(
      _unrolled(_decoder(num_layers=2))) / 2


def test_stacked_params_shard_like_their_layers():
  cfg = _decoder(num_layers=2)
  boxed = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0), boxed=True))
  kernel = boxed["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  mesh = sharding.make_mesh((1, 2, 4), config_utils.MESH_AXES)
  specs = sharding.shardings_for(boxed, mesh, config_utils.DEFAULT_RULES)
  # The layers axis stays whole; each layer's matrix is split as the unrolled one is.
  assert tuple(specs["layers"]["mlp"]["gate_proj"]["kernel"].spec) == (None, "fsdp", "tensor")


def test_hf_round_trip_from_either_layout(tmp_path):
  cfg = _decoder(num_layers=2)
  params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(7)))
  state = hf.to_hf_state_dict(cfg, params)
  assert "model.layers.1.mlp.down_proj.weight" in state
  _assert_trees_close(hf.to_hf_state_dict(_unrolled(cfg), stacking.per_layer(params)), state, 0)
  # Loading a tower stacks it only when the config scans; in_layout converts between the two.
  unrolled = stacking.in_layout(params, _unrolled(cfg))
  assert "layers_1" in unrolled and "layers" not in unrolled
  _assert_trees_close(stacking.in_layout(unrolled, cfg), params, 0)
