"""Attention kernels: the blockwise path gives the dense path's numbers (masks, GQA, window, cache).

Also the per-backend choice, the dense kernel's hand-written backward, and that the blockwise path
never holds [T,S] logits.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2llm_jax.models import attention, bert, layers, llama, stacking

TOL = 1e-5


def _qkv(rng, batch, length, keys, heads, kv_heads, head_dim=16):
  q_rng, k_rng, v_rng = jax.random.split(rng, 3)
  return (jax.random.normal(q_rng, (batch, length, heads, head_dim)),
          jax.random.normal(k_rng, (batch, keys, kv_heads, head_dim)),
          jax.random.normal(v_rng, (batch, keys, kv_heads, head_dim)))


def _holey_mask(length, seed=0):
  """Key masks with padding at the left, the right and in the middle of rows."""
  rng = np.random.default_rng(seed)
  mask = (rng.random((2, length)) > 0.3).astype(np.int32)
  mask[0, :3] = 0
  mask[1, -4:] = 0
  mask[:, 5] = 1
  return jnp.asarray(mask)


@pytest.mark.parametrize("window", [None, 7])
def test_blockwise_matches_dense_causal_gqa_padding_window(window):
  length = 45  # blocks of 16 and 8 leave remainders on both axes
  q, k, v = _qkv(jax.random.key(0), 2, length, length, heads=6, kv_heads=2)
  key_mask = _holey_mask(length)
  slots = jnp.broadcast_to(jnp.arange(length), (2, length))
  positions = llama.positions_from_mask(key_mask)
  mask = attention.AttentionMask(key_valid=key_mask.astype(bool), query_slots=slots,
                                 query_positions=positions, key_positions=positions,
                                 sliding_window=window, aligned=True)
  dense = jax.nn.dot_product_attention(q, k, v, mask=mask.dense())
  blockwise = attention.blockwise_attention(q, k, v, mask, block_q=16, block_k=8)
  np.testing.assert_allclose(blockwise, dense, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("length,window", [(48, None), (45, None), (48, 20)])
def test_blockwise_matches_dense_without_padding(length, window):
  """No padded keys: blocks below the causal diagonal (and inside the window) run unmasked,
  those on it masked, those above skipped; all must give the dense numbers, values and grads."""
  q, k, v = _qkv(jax.random.key(6), 2, length, length, heads=6, kv_heads=2)
  key_mask = jnp.ones((2, length), jnp.int32)
  slots = jnp.broadcast_to(jnp.arange(length), (2, length))
  mask = attention.AttentionMask(key_valid=key_mask.astype(bool), query_slots=slots,
                                 query_positions=slots, key_positions=slots,
                                 sliding_window=window, aligned=True)
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense())
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, mask, 16, 8)
  np.testing.assert_allclose(blockwise(q, k, v), dense(q, k, v), atol=TOL, rtol=TOL)
  weights = jax.random.normal(jax.random.key(7), q.shape)
  grads = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), (0, 1, 2))(q, k, v)
  for got_grad, want_grad in zip(grads(blockwise), grads(dense)):
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4, rtol=1e-4)


def test_blockwise_matches_dense_bidirectional_key_padding():
  q, k, v = _qkv(jax.random.key(1), 2, 30, 30, heads=4, kv_heads=4)
  key_mask = _holey_mask(30, seed=1)
  mask = attention.key_padding_mask(key_mask)
  dense = jax.nn.dot_product_attention(q, k, v, mask=mask.dense())
  blockwise = attention.blockwise_attention(q, k, v, mask, block_q=7, block_k=9)
  np.testing.assert_allclose(blockwise, dense, atol=TOL, rtol=TOL)


def test_blockwise_gradients_match_dense():
  length = 40
  q, k, v = _qkv(jax.random.key(2), 2, length, length, heads=4, kv_heads=2)
  key_mask = _holey_mask(length, seed=2)
  slots = jnp.broadcast_to(jnp.arange(length), (2, length))
  positions = llama.positions_from_mask(key_mask)
  mask = attention.AttentionMask(key_valid=key_mask.astype(bool), query_slots=slots,
                                 query_positions=positions, key_positions=positions)
  weights = jax.random.normal(jax.random.key(3), q.shape)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  dense = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense())),
                   argnums=(0, 1, 2))(q, k, v)
  blockwise = jax.grad(loss(lambda q, k, v: attention.blockwise_attention(q, k, v, mask, 16, 16)),
                       argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(blockwise, dense):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_head", [False, True])
def test_dense_kernel_matches_jax_dot_product_attention(per_head):
  """Our dense kernel against jax's reference: GQA, causal + padding masks (shared by the heads
  or one per head), a row that sees nothing, forward and gradients."""
  length, keys, heads, kv_heads = 12, 17, 6, 2
  q, k, v = _qkv(jax.random.key(4), 2, length, keys, heads=heads, kv_heads=kv_heads)
  rng = np.random.default_rng(4)
  mask = rng.random((2, heads if per_head else 1, length, keys)) > 0.4
  mask[0, :, 3] = False  # a query with no visible key
  mask = jnp.asarray(mask)
  weights = jax.random.normal(jax.random.key(5), q.shape)
  ours_fn = lambda q, k, v: attention.dense_attention(q, k, v, mask)
  ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ours_fn(q, k, v), ref_fn(q, k, v), atol=TOL, rtol=TOL)
  grads = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), (0, 1, 2))(q, k, v)
  for got, want in zip(grads(ours_fn), grads(ref_fn)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = ours_fn(*half)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), ref_fn(*half).astype(jnp.float32),
                             atol=2e-2, rtol=2e-2)
  half_grads = jax.grad(lambda q, k, v: jnp.sum(ours_fn(q, k, v).astype(jnp.float32) * weights),
                        (0, 1, 2))(*half)
  for got, want in zip(half_grads, grads(ref_fn)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("per_head", [False, True])
def test_dense_kernel_takes_a_key_mask_as_a_bias_with_the_same_numbers(per_head):
  """A mask of keys only ([B,·,1,S]) is added to the logits rather than selected: the same outputs
  and gradients as the same mask given per query, which takes the select, with large logits and
  a sequence whose every key is padding (its rows average the values, as jax's do)."""
  length, keys, heads, kv_heads = 10, 14, 6, 2
  q, k, v = _qkv(jax.random.key(9), 3, length, keys, heads=heads, kv_heads=kv_heads)
  q = q * 300.0  # logits in the thousands: MASKED + l must still round to MASKED
  rng = np.random.default_rng(9)
  key_mask = rng.random((3, heads if per_head else 1, 1, keys)) > 0.4
  key_mask[:, :, :, 0] = True
  key_mask[2] = False  # a sequence with no real key
  key_mask = jnp.asarray(key_mask)
  per_query = jnp.broadcast_to(key_mask, (3, key_mask.shape[1], length, keys))
  weights = jax.random.normal(jax.random.key(10), q.shape)
  loss = lambda mask: lambda q, k, v: jnp.sum(attention.dense_attention(q, k, v, mask) * weights)
  value_and_grads = lambda mask: jax.jit(jax.value_and_grad(loss(mask), (0, 1, 2)))(q, k, v)
  bias_loss, bias_grads = value_and_grads(key_mask)
  select_loss, select_grads = value_and_grads(per_query)
  np.testing.assert_allclose(bias_loss, select_loss, rtol=1e-6)
  for got, want in zip(bias_grads, select_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  out = attention.dense_attention(q, k, v, key_mask)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, mask=key_mask), atol=TOL,
                             rtol=TOL)
  np.testing.assert_allclose(out[2], jnp.broadcast_to(
      jnp.repeat(v[2].mean(0), heads // kv_heads, axis=0), out[2].shape), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_kernel_in_groups_gives_the_same_numbers(dtype):
  """The batch taken 2 sequences at a time (5 = 2 + 2 + a remainder of 1): the same outputs and
  gradients as all at once (in bfloat16 the groups' outputs are stacked as uint16 bits)."""
  batch, length, keys = 5, 9, 13
  tol = TOL if dtype == jnp.float32 else 1e-2
  q, k, v = (x.astype(dtype) for x in
             _qkv(jax.random.key(7), batch, length, keys, heads=6, kv_heads=2))
  rng = np.random.default_rng(7)
  mask = rng.random((batch, 1, length, keys)) > 0.4
  mask[0, 0, 2] = False  # a query with no visible key
  mask = jnp.asarray(mask)
  weights = jax.random.normal(jax.random.key(8), q.shape)
  run = lambda group: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(attention.dense_attention(q, k, v, mask, group) * weights),
      (0, 1, 2)))(q, k, v)
  (want_loss, want_grads), (got_loss, got_grads) = run(0), run(2)
  np.testing.assert_allclose(got_loss, want_loss, rtol=tol)
  as_f32 = lambda x: np.asarray(x, np.float32)
  for got, want in zip(got_grads, want_grads):
    assert got.dtype == dtype
    np.testing.assert_allclose(as_f32(got), as_f32(want), atol=tol, rtol=tol)
  np.testing.assert_allclose(as_f32(attention.dense_attention(q, k, v, mask, 2)),
                             as_f32(attention.dense_attention(q, k, v, mask)), atol=tol, rtol=tol)


def test_cache_group_sizes():
  """Powers of two whose float32 logits fit the cache budget; 0 for a batch whose logits are
  small enough to take at once."""
  from e2llm_jax.models import dense_kernel
  minilm_chunk = 12 * 128 * 128 * 4  # bytes of one chunk's logits
  group = dense_kernel.cache_group((64, 128, 12, 32), 128)
  assert group & (group - 1) == 0 and group * minilm_chunk <= dense_kernel.CACHE_GROUP_BYTES
  assert 2 * group * minilm_chunk > dense_kernel.CACHE_GROUP_BYTES
  assert dense_kernel.cache_group((16, 128, 12, 32), 128) == group  # 12.6 MB: split
  assert dense_kernel.cache_group((4, 176, 9, 64), 176) == 0  # 4.5 MB: at once
  assert dense_kernel.cache_group((8, 1024, 16, 64), 1024) == 1  # 64 MB a sequence
  # With several devices (the suite runs 8 CPU ones) the batch may be sharded: never split.
  assert jax.device_count() > 1 and attention._cpu_cache_group((64, 128, 12, 32), 128) == 0


def test_dense_kernel_backward_keeps_no_float_logits():
  """Of [T,S], the dense kernel keeps only the boolean mask for its backward; jax's autodiff of
  the same softmax kept float32 probabilities, one [T,S] per head and layer."""
  length, keys = 24, 40
  q, k, v = _qkv(jax.random.key(6), 1, length, keys, heads=4, kv_heads=2)
  mask = jnp.ones((1, 1, length, keys), bool)
  loss = lambda q, k, v: jnp.sum(attention.dense_attention(q, k, v, mask))
  kept = jax.tree.leaves(jax.vjp(loss, q, k, v)[1])
  assert not [x for x in kept if x.dtype != bool and x.size >= length * keys * 4], \
      [(x.shape, x.dtype) for x in kept]
  reference = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask))
  kept = jax.tree.leaves(jax.vjp(reference, q, k, v)[1])
  assert [x for x in kept if x.dtype != bool and x.size >= length * keys * 4]  # the test can fail


def _tiny_decoder(kind, window=None):
  return llama.DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=window,
                             attention=kind, attention_block_q=8, attention_block_k=8)


@pytest.fixture(scope="module")
def decoder_params():
  return llama.init_params(_tiny_decoder("xla"), jax.random.key(4))


def test_decoder_forward_same_logits_blockwise_and_dense(decoder_params, window=5):
  ids = jax.random.randint(jax.random.key(5), (2, 29), 0, 64)
  mask = _holey_mask(29, seed=3)
  logits = {kind: llama.decoder_logits(_tiny_decoder(kind, window), decoder_params, input_ids=ids,
                                       attention_mask=mask)
            for kind in ("xla", "blockwise")}
  np.testing.assert_allclose(logits["blockwise"], logits["xla"], atol=TOL, rtol=TOL)


def test_cached_prefill_and_decode_same_logits_blockwise_and_dense(decoder_params):
  ids = jax.random.randint(jax.random.key(6), (2, 21), 0, 64)
  prompt_mask = _holey_mask(17, seed=4)
  results = {}
  for kind in ("xla", "blockwise"):
    cfg = _tiny_decoder(kind, window=6)
    cache = llama.init_cache(cfg, 2, 24)
    prefill, cache = llama.decoder_step(cfg, decoder_params, cache, input_ids=ids[:, :17],
                                        attention_mask=prompt_mask)
    steps = []
    for t in range(17, 21):  # decode one query at a time against the cached keys
      logits, cache = llama.decoder_step(cfg, decoder_params, cache, input_ids=ids[:, t:t + 1])
      steps.append(logits)
    results[kind] = (prefill, jnp.concatenate(steps, axis=1))
  for got, want in zip(results["blockwise"], results["xla"]):
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_encoder_same_hidden_blockwise_and_dense():
  cfg = bert.EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=40, max_position_embeddings=40,
                           attention_block_q=8, attention_block_k=16)
  params = bert.init_params(cfg, jax.random.key(7))
  ids = jax.random.randint(jax.random.key(8), (2, 33), 1, 50)
  mask = _holey_mask(33, seed=5)
  hidden = {kind: bert.encode(dataclasses.replace(cfg, attention=kind), params, ids, mask)
            for kind in ("xla", "blockwise")}
  np.testing.assert_allclose(hidden["blockwise"], hidden["xla"], atol=TOL, rtol=TOL)


def test_auto_choice_per_backend_and_shape():
  mask = attention.key_padding_mask(jnp.ones((1, 4), bool))
  aligned = attention.AttentionMask(key_valid=jnp.ones((1, 4), bool),
                                    query_slots=jnp.zeros((1, 4), jnp.int32), aligned=True)
  assert attention.resolve("auto", 128, 128, jnp.float32, mask, "cpu") == "xla"
  assert attention.resolve("auto", 8192, 8192, jnp.float32, mask, "cpu") == "blockwise"
  assert attention.resolve("auto", 1, 8192, jnp.float32, mask, "cpu") == "xla"  # one decode query
  assert attention.resolve("auto", 8192, 8192, jnp.bfloat16, mask, "gpu") == "cudnn"
  assert attention.resolve("auto", 8192, 8192, jnp.float32, mask, "gpu") == "blockwise"
  # cuDNN takes these masks as lengths, so no length is too long for it ...
  assert attention.resolve("auto", 131072, 131072, jnp.bfloat16, aligned, "gpu") == "cudnn"
  # ... but a sliding window, or a KV cache's queries, it would read as a dense bias: ours instead.
  windowed = dataclasses.replace(aligned, sliding_window=64)
  assert attention.resolve("auto", 131072, 131072, jnp.bfloat16, windowed, "gpu") == "blockwise"
  cached = dataclasses.replace(aligned, aligned=False)
  assert attention.resolve("auto", 1, 8192, jnp.bfloat16, cached, "gpu") == "xla"
  assert attention.resolve("auto", 8192, 8192, jnp.bfloat16, aligned, "tpu") == "pallas"
  assert attention.resolve("auto", 8192, 8192, jnp.bfloat16, mask, "tpu") == "blockwise"
  assert attention.resolve("blockwise", 8, 8, jnp.float32, None, "cpu") == "xla"  # dense mask given
  with pytest.raises(ValueError, match="model.attention"):
    attention.resolve("flash", 8, 8, jnp.float32, mask, "cpu")


# jax's reference kernel, standing in for the cuDNN call on the CPU.
_REFERENCE_KERNEL = functools.partial(jax.nn.dot_product_attention, implementation="xla")


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_takes_padding_anywhere_as_lengths(monkeypatch, causal):
  # jax's reference implementation stands in for the cuDNN call on the CPU, marked (+1000) so the
  # result shows that cuDNN ran: as it stands for right padding, with the real keys (and causal
  # queries) moved to the front for padding on the left or in holes.
  monkeypatch.setattr(attention, "_cudnn", lambda *a, **kw: _REFERENCE_KERNEL(*a, **kw) + 1000)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 4, 8)) for i in range(3))
  right = jnp.asarray([[1] * 12, [1] * 9 + [0] * 3], bool)
  left = jnp.asarray([[1] * 12, [0] * 3 + [1] * 9], bool)
  holes = jnp.asarray([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1] * 2], bool)
  for key_valid in (right, left, holes):
    slots = jnp.broadcast_to(jnp.arange(12), (2, 12)) if causal else None
    mask = attention.AttentionMask(key_valid=key_valid, query_slots=slots, aligned=causal)
    forward = jax.jit(lambda q, k, v: attention.attention(q, k, v, mask, "cudnn"))
    want = attention.dense_attention(q, k, v, mask.dense()) + 1000
    rows = key_valid if causal else jnp.ones_like(key_valid)  # causal padded rows are never read
    np.testing.assert_allclose(forward(q, k, v)[rows], want[rows], atol=TOL, rtol=TOL)
    # Gradients flow back through the moves to the slots they came from (a linear loss: the
    # marker does not reach them).
    weights = jax.random.normal(jax.random.key(3), q.shape) * rows[:, :, None, None]
    loss = lambda kind: lambda q, k, v: jnp.sum(attention.attention(q, k, v, mask, kind) * weights)
    got, want = (jax.grad(loss(kind), argnums=(0, 1, 2))(q, k, v) for kind in ("cudnn", "xla"))
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL)


def test_cudnn_gets_no_empty_row_and_the_moved_branch_keeps_no_logits(monkeypatch):
  # Rematerialised, the stand-in keeps no [T,S] residuals of its own, as cuDNN keeps none.
  def stand_in(q, k, v, is_causal, key_value_seq_lengths):
    return jax.checkpoint(lambda q, k, v, n: _REFERENCE_KERNEL(q, k, v, is_causal=is_causal,
                                                               key_value_seq_lengths=n))(
        q, k, v, key_value_seq_lengths)
  monkeypatch.setattr(attention, "_cudnn", stand_in)
  q = jax.random.normal(jax.random.key(0), (2, 64, 2, 8))
  padded_chunk = attention.key_padding_mask(jnp.asarray([[True] * 64, [False] * 64]))
  out = attention.attention(q, q, q, padded_chunk, "cudnn")
  # The empty row is given one key (fused kernels are known to return NaN for none): it reads
  # the first.
  np.testing.assert_allclose(out[1], jnp.broadcast_to(q[1, :1], (64, 2, 8)), atol=TOL, rtol=TOL)
  # Under a gradient the cond keeps the operands, not the other branch's [T,S] logits.
  loss = lambda q: jnp.sum(attention.attention(q, q, q, padded_chunk, "cudnn") ** 2)
  kept = [residual.shape for residual in jax.tree.leaves(jax.vjp(loss, q)[1])]
  assert not any(shape[-2:] == (64, 64) for shape in kept), kept


def test_blockwise_never_holds_full_logits():
  length, heads = 8192, 1
  q = jax.ShapeDtypeStruct((1, length, heads, 16), jnp.float32)
  key_valid = jax.ShapeDtypeStruct((1, length), bool)
  slots = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def forward_and_backward(q, key_valid, slots):
    mask = attention.AttentionMask(key_valid=key_valid, query_slots=slots, aligned=True)
    loss = lambda q: jnp.sum(attention.blockwise_attention(q, q, q, mask, 256, 256))
    return jax.grad(loss)(q)

  compiled = jax.jit(forward_and_backward).lower(q, key_valid, slots).compile()
  full_logits = length * length * heads * 4  # one float32 [T,S]; the dense backward holds several
  assert compiled.memory_analysis().temp_size_in_bytes < full_logits / 4


def test_rematerialised_decoder_layers_give_same_gradients(decoder_params):
  ids = jax.random.randint(jax.random.key(9), (1, 12), 0, 64)

  def loss(cfg):
    return lambda p: jnp.sum(llama.decoder_logits(cfg, p, input_ids=ids) ** 2)

  plain = jax.grad(loss(_tiny_decoder("xla")))(decoder_params)
  remat = jax.grad(loss(dataclasses.replace(_tiny_decoder("xla"), remat=True)))(decoder_params)
  for got, want in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_encoder_in_groups_gives_the_same_hidden_states(monkeypatch):
  cfg = bert.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=24, max_position_embeddings=16)
  params = bert.init_params(cfg, jax.random.key(10))
  ids = jax.random.randint(jax.random.key(11), (7, 16), 1, 50)
  mask = jnp.ones_like(ids).at[:, 12:].set(0)
  whole = bert.encode(cfg, params, ids, mask)
  monkeypatch.setattr(bert, "ENCODE_GROUP_TOKENS", 48)  # 7 chunks: 2 groups of 3, then 1
  np.testing.assert_allclose(bert.encode(cfg, params, ids, mask), whole, atol=TOL, rtol=TOL)
  # `pool` runs on each group: only the pooled vectors leave the group loop, never hidden states.
  mean = lambda hidden, m: jnp.sum(hidden * m[..., None], 1) / jnp.sum(m, 1, keepdims=True)
  np.testing.assert_allclose(bert.encode(cfg, params, ids, mask, pool=mean), mean(whole, mask),
                             atol=TOL, rtol=TOL)
  pooled_jaxpr = jax.make_jaxpr(lambda i: bert.encode(cfg, params, i, mask, pool=mean))(ids)
  stacked = [v.aval.shape for e in pooled_jaxpr.eqns if e.primitive.name in ("scan", "while")
             for v in e.outvars]
  assert (2, 3, 16) in stacked and (2, 3, 16, 16) not in stacked
  # Under a gradient the groups give the same gradients (the train step's path on one CPU device).
  loss = lambda p, grouped: jnp.sum(bert.encode(cfg, p, ids, mask, grouped=grouped, pool=mean) ** 2)
  for got, want in zip(jax.tree.leaves(jax.grad(loss)(params, True)),
                       jax.tree.leaves(jax.grad(loss)(params, False))):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
  # With grouped=False (the train step's path elsewhere) the chunks run as one batch: no group loop.
  unrolled = dataclasses.replace(cfg, scan_layers=False)  # so the only loop would be the groups'
  loop_free = jax.make_jaxpr(lambda i: bert.encode(unrolled, stacking.per_layer(params), i, mask,
                                                   grouped=False))(ids)
  assert "scan" not in str(loop_free)
  assert "scan" in str(jax.make_jaxpr(lambda i: bert.encode(cfg, params, i, mask))(ids))
  np.testing.assert_allclose(bert.encode(cfg, params, ids, mask, grouped=False), whole, atol=TOL,
                             rtol=TOL)


def test_encoder_skips_the_groups_after_the_last_real_chunk(monkeypatch):
  # The inference engine pads its encoder calls to bucket sizes with whole chunks of padding.
  cfg = bert.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                           intermediate_size=24, max_position_embeddings=16)
  params = bert.init_params(cfg, jax.random.key(13))
  ids = jax.random.randint(jax.random.key(14), (11, 16), 1, 50)
  mask = jnp.ones_like(ids).at[:, 12:].set(0).at[4:].set(0)  # chunks 0-3 real, then padding
  monkeypatch.setattr(bert, "ENCODE_GROUP_TOKENS", 48)  # 11 chunks: 3 groups of 3, then 2
  monkeypatch.setattr(bert, "groups_under_gradient", lambda: True)  # as on one CPU device
  ran, computed = bert.encode(cfg, params, ids, mask), bert.encode(cfg, params, ids, mask,
                                                                 differentiated=True)
  # Groups 0-1 hold real chunks and run; group 2 (chunks 6-8) comes after the last real chunk and
  # does not; the rest (9-10), shorter than a group, runs as ever.
  np.testing.assert_array_equal(ran[:6], computed[:6])
  np.testing.assert_array_equal(ran[6:9], 0.0)
  assert float(jnp.abs(computed[6:9]).min()) > 0.0
  np.testing.assert_array_equal(ran[9:], computed[9:])
  np.testing.assert_allclose(ran[:4], bert.encode(cfg, params, ids, mask, grouped=False)[:4],
                             atol=TOL, rtol=TOL)
  # Inside jit the last real chunk is a traced value: one compiled call serves any count.
  encode = jax.jit(lambda m: bert.encode(cfg, params, ids, m))
  np.testing.assert_allclose(encode(mask), ran, atol=TOL, rtol=TOL)
  np.testing.assert_array_equal(encode(mask.at[:, :].set(0).at[0, 0].set(1))[3:9], 0.0)
  # A real chunk in the last group keeps every group: only groups after the last one are skipped.
  assert float(jnp.abs(encode(mask.at[7, 0].set(1))[3:9]).min()) > 0.0


def test_encoder_groups_are_large_off_the_cpu(monkeypatch):
  # A GPU's matmuls need many rows: there the 64 chunks below run as one batch, on a CPU in groups.
  cfg = bert.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=24, max_position_embeddings=128, scan_layers=False)
  params = stacking.per_layer(bert.init_params(dataclasses.replace(cfg, scan_layers=True),
                                               jax.random.key(12)))
  ids = jnp.ones((64, 128), jnp.int32)
  loops = lambda: any(loop in str(jax.make_jaxpr(lambda i: bert.encode(cfg, params, i, i))(ids))
                      for loop in ("scan", "while"))
  assert loops()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not loops()


def test_bf16_dots_ask_for_float32_only_on_the_cpu(monkeypatch):
  # Off the CPU the matmul units accumulate in float32; a float32 result would only move more bytes.
  x = jnp.ones((4, 8), jnp.bfloat16)
  widened = lambda: "preferred_element_type=float32" in str(
      jax.make_jaxpr(lambda x: layers.matmul(x, x.T))(x))
  assert widened()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not widened()
