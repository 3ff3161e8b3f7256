"""bfloat16 on the CPU: residuals and layer-scan kernels packed as uint16 (the kernels once, at
rest), the matmul's bf16 backward, the gated activation, the tied head.

Each speed property is checked in the program XLA compiles, against the program without it.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e2llm_jax.models import bert, layers, llama, lora, packing

# XLA:CPU's name for a fusion that widens a whole bf16 stack to write one slice of it.
WIDENED_STACK_WRITE = "dynamic-update-slice_convert_fusion"


def test_pack_round_trips_16_bit_floats_only_on_the_cpu(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (3, 5))
  tree = {"bf16": x.astype(jnp.bfloat16), "f16": x.astype(jnp.float16), "f32": x,
          "ints": jnp.arange(4, dtype=jnp.uint16), "none": None}
  packed = packing.pack(tree)
  assert isinstance(packed["bf16"], packing.Packed) and packed["bf16"].bits.dtype == jnp.uint16
  assert isinstance(packed["f16"], packing.Packed)
  assert packed["f32"] is x and packed["ints"] is tree["ints"] and packed["none"] is None
  back = packing.unpack(packed)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32)))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert packing.pack(tree)["bf16"] is tree["bf16"]


def test_bf16_matmul_backward_is_autodiffs_with_bf16_dots():
  """The same gradients as autodiff of the float32-accumulated product, from dots whose operands
  are all bf16 (autodiff's transposes take a float32 cotangent, which XLA:CPU widens to float32
  dots)."""
  x = jax.random.normal(jax.random.key(1), (2, 7, 32)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (32, 24)).astype(jnp.bfloat16)
  weights = jax.random.normal(jax.random.key(3), (2, 7, 24))
  plain = lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * weights)
  np.testing.assert_array_equal(np.asarray(layers.matmul(x, w).astype(jnp.float32)),
                                np.asarray(plain(x, w).astype(jnp.float32)))
  got, want = jax.grad(loss(layers.matmul), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.dtype == r.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(r.astype(jnp.float32)),
                               rtol=1e-2, atol=1e-2)

  # A float32 weight (a LoRA factor) is cast inside, and its gradient comes back in float32.
  w32 = w.astype(jnp.float32) + 1e-3
  got = jax.grad(loss(layers.matmul), 1)(x, w32)
  want = jax.grad(loss(lambda x, w: plain(x, w.astype(x.dtype))), 1)(x, w32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)

  dot_operand_dtypes = lambda fn: _dots(jax.make_jaxpr(jax.grad(loss(fn), (0, 1)))(x, w).jaxpr)
  assert dot_operand_dtypes(layers.matmul) == {("bfloat16", "bfloat16")}
  assert ("float32", "bfloat16") in dot_operand_dtypes(plain)


def _dots(jaxpr) -> set:
  """Operand dtypes of every dot_general in `jaxpr` and the jaxprs it calls."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found |= _dots(sub)
  return found


@pytest.mark.parametrize("name", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_activation_is_autodiffs(name, dtype):
  gate, up = (jax.random.normal(jax.random.key(i), (3, 16)).astype(dtype) for i in (4, 5))
  weights = jax.random.normal(jax.random.key(6), (3, 16))
  plain = lambda g, u: layers.activation(name)(g) * u
  loss = lambda fn: lambda g, u: jnp.sum(fn(g, u).astype(jnp.float32) * weights)
  gated = layers.gated_activation(name)
  assert gated(gate, up).dtype == dtype
  np.testing.assert_array_equal(np.asarray(gated(gate, up), np.float32),
                                np.asarray(plain(gate, up), np.float32))
  grads = lambda fn: jax.grad(loss(fn), (0, 1))(gate, up)
  for got, want in zip(grads(gated), grads(plain)):
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _compiled_gradient_text(tower: str) -> str:
  """The optimized HLO of a bf16 scanned tower's LoRA gradients."""
  _, trained, grad = _bf16_tower_gradient(tower)
  return grad.lower(trained).compile().as_text()


def _bf16(params):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def _bf16_decoder(**overrides):
  """(config, bf16 params) of a tiny scanned decoder computing in bf16."""
  cfg = llama.DecoderConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                      dtype="bfloat16"), **overrides})
  return cfg, _bf16(llama.init_params(cfg, jax.random.key(0)))


def _bf16_tower_gradient(tower: str):
  """(bf16 params, LoRA tree, jitted gradient of a loss over the tower's output in the LoRA)."""
  if tower == "encoder":
    cfg = bert.EncoderConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4,
                             intermediate_size=48, max_position_embeddings=16, dtype="bfloat16")
    params = _bf16(bert.init_params(cfg, jax.random.key(0)))
    ids = jnp.ones((2, 16), jnp.int32)
    forward = lambda p, t: bert.encode(cfg, p, ids, ids, lora=t)
    targets = "query|value|intermediate"
  else:
    cfg, params = _bf16_decoder()
    ids = jnp.ones((2, 12), jnp.int32)
    forward = lambda p, t: llama.decoder_logits(cfg, p, ids, lora=t)
    targets = "q_proj|v_proj|down_proj"
  trained = lora.init(jax.random.key(1), params, lora.LoRAConfig(4, 8.0, targets))
  grad = jax.jit(jax.grad(lambda t: jnp.sum(forward(params, t).astype(jnp.float32) ** 2)))
  return params, trained, grad


def _widened_stack_writes(hlo: str) -> list[int]:
  """Elements per layer of each bf16 stack the program widens to write one slice of."""
  sizes = re.findall(WIDENED_STACK_WRITE + r"[.0-9]* = bf16\[(\d+)((?:,\d+)*)\]", hlo)
  return [int(np.prod([int(d) for d in rest.split(",")[1:]])) for _, rest in sizes]


@pytest.mark.parametrize("tower", ["encoder", "decoder"])
def test_bf16_scan_writes_its_activation_stacks_in_place(tower, monkeypatch):
  # What is left widened is a norm's [1,1,hidden] scale (32 elements a layer here), not activations.
  assert max(_widened_stack_writes(_compiled_gradient_text(tower)), default=0) <= 32
  # The check can fail: unpacked, the same program widens its [batch, tokens, ...] stacks.
  monkeypatch.setattr(packing, "pack", lambda tree: tree)
  monkeypatch.setattr(packing, "unpack", lambda tree: tree)
  assert max(_widened_stack_writes(_compiled_gradient_text(tower))) >= 2 * 12 * 32


@pytest.mark.parametrize("tower", ["encoder", "decoder"])
def test_bf16_scan_slices_its_kernel_stacks_without_widening_them(tower, monkeypatch):
  """XLA:CPU slices a bf16 stack in a loop by widening all of it to float32 first; the layer scan
  slices its frozen kernels as uint16 instead, with the same gradients."""
  def widened_kernel_stacks(params, grad, trained):
    flat = traverse_util.flatten_dict(params)
    shapes = {leaf.shape for path, leaf in flat.items() if path[-1] == "kernel" and leaf.ndim == 3}
    hlo = grad.lower(trained).compile().as_text()
    return [shape for shape in shapes if f"f32[{','.join(map(str, shape))}]" in hlo]

  params, trained, grad = _bf16_tower_gradient(tower)
  assert widened_kernel_stacks(params, grad, trained) == []
  packed_grads = grad(trained)
  # The check can fail: with the kernels sliced as they are stored, the program widens them.
  monkeypatch.setattr(layers, "_packed_kernels", lambda tree: tree)
  params, trained, grad = _bf16_tower_gradient(tower)
  assert widened_kernel_stacks(params, grad, trained)
  for got, want in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grad(trained))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bf16_tied_head_gives_float32_logits_of_bf16_dots():
  """The tied output head multiplies the bf16 hidden states by the bf16 table into float32 logits
  (not rounded to bf16), and its backward's dots are bf16 too, where it made a float32 copy of the
  whole table for a float32 dot over the vocabulary (bench/RESULTS.md, 2026-12-07)."""
  cfg, params = _bf16_decoder(num_layers=2, tie_word_embeddings=True)
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  hidden = llama.decoder_forward(cfg, params, input_ids=ids, return_hidden=True)
  logits = llama.logits_from_hidden(cfg, params, hidden)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  table = params["embed_tokens"]["embedding"]
  want = hidden.astype(jnp.float32) @ table.astype(jnp.float32).T
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)
  trained = lora.init(jax.random.key(1), params, lora.LoRAConfig(4, 8.0, "q_proj|v_proj"))
  loss = lambda t: jnp.sum(llama.decoder_logits(cfg, params, ids, lora=t) ** 2)
  assert _dots(jax.make_jaxpr(jax.grad(loss))(trained).jaxpr) == {("bfloat16", "bfloat16")}


def test_bf16_decoding_reads_packed_kernels_with_the_same_logits(monkeypatch):
  """Prefill and a token step through the KV cache (the engine's path) give the same bf16 logits
  with the scan's kernels packed as without."""
  cfg, params = _bf16_decoder()
  prompt = jnp.arange(1, 11, dtype=jnp.int32).reshape(1, 10)

  def prefill_then_step():
    step = jax.jit(lambda cache, ids: llama.decoder_step(cfg, params, cache, input_ids=ids))
    first, cache = step(llama.init_cache(cfg, 1, 16), prompt)
    second, _ = step(cache, jnp.argmax(first[:, -1:], axis=-1).astype(jnp.int32))
    return first, second

  packed = prefill_then_step()
  monkeypatch.setattr(layers, "_packed_kernels", lambda tree: tree)
  for got, want in zip(packed, prefill_then_step()):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _whole_stack_packings(hlo: str, num_layers: int) -> int:
  """How many [layers, ...] bf16 kernel stacks the program copies into uint16."""
  return len(re.findall(rf"\(\S+: bf16\[{num_layers},\d+,\d+\]\) -> u16\[{num_layers},", hlo))


def test_kernels_held_at_rest_are_not_packed_again_by_every_call():
  """`kernels_at_rest` packs a bf16 tower's layer-stack kernels once, so a jitted step that takes
  them copies no stack, with the same logits; float32 towers come back as they are."""
  cfg, params = _bf16_decoder()
  at_rest = layers.kernels_at_rest(params)
  flat = traverse_util.flatten_dict(at_rest)
  assert {path[-2] for path, leaf in flat.items() if isinstance(leaf, packing.Packed)} == {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  assert all(leaf.bits.dtype == jnp.uint16 for leaf in flat.values()
             if isinstance(leaf, packing.Packed))
  assert at_rest["embed_tokens"] is params["embed_tokens"]
  assert layers.kernels_at_rest(at_rest)["layers"]["mlp"]["up_proj"]["kernel"].bits is (
      at_rest["layers"]["mlp"]["up_proj"]["kernel"].bits)
  prompt = jnp.arange(1, 11, dtype=jnp.int32).reshape(1, 10)
  step = jax.jit(lambda p, cache, ids: llama.decoder_step(cfg, p, cache, input_ids=ids)[0])
  cache = llama.init_cache(cfg, 1, 16)
  assert _whole_stack_packings(step.lower(at_rest, cache, prompt).compile().as_text(), 3) == 0
  # The check can fail: given the bf16 stacks, the same step packs all seven of them each call.
  assert _whole_stack_packings(step.lower(params, cache, prompt).compile().as_text(), 3) == 7
  np.testing.assert_array_equal(np.asarray(step(at_rest, cache, prompt)),
                                np.asarray(step(params, cache, prompt)))
  f32_params = llama.init_params(dataclasses.replace(cfg, dtype="float32"), jax.random.key(0))
  assert all(a is b for a, b in zip(jax.tree.leaves(layers.kernels_at_rest(f32_params)),
                                    jax.tree.leaves(f32_params)))
