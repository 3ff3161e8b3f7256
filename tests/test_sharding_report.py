"""Sharding visibility: arrays kept whole because a mesh axis does not divide them are named.

Runs on the 8 fake CPU devices of conftest.py.
"""

import jax

from e2llm_jax import config_utils, sharding
from e2llm_jax.models import llama


def _boxed_decoder(hidden_size):
  cfg = llama.DecoderConfig(vocab_size=512, hidden_size=hidden_size, intermediate_size=64,
                            num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8)
  return jax.eval_shape(lambda r: llama.init_params(cfg, r, boxed=True), jax.random.key(0))


def test_warning_names_arrays_an_axis_does_not_divide():
  mesh = sharding.make_mesh((1, 8, 1), config_utils.MESH_AXES)
  message = sharding.replication_warning(_boxed_decoder(36), mesh, config_utils.DEFAULT_RULES, 0.1)
  assert message is not None
  assert "embed_tokens/embedding (512, 36): fsdp (8) on dim 1 (36)" in message
  assert "mesh.replicated_warn_share" in message


def test_no_warning_when_axes_divide_or_share_is_below_threshold():
  mesh = sharding.make_mesh((1, 8, 1), config_utils.MESH_AXES)
  rules = config_utils.DEFAULT_RULES
  assert sharding.replication_warning(_boxed_decoder(32), mesh, rules, 0.1) is None
  assert sharding.replication_warning(_boxed_decoder(36), mesh, rules, 1.0) is None
  assert sharding.kept_whole(("embed", "vocab"), (32, 512), mesh, rules) == []
  assert sharding.kept_whole(("embed", "vocab"), (36, 512), mesh, rules) == [
      "fsdp (8) on dim 0 (36)"]
