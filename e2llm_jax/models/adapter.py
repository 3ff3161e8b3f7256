"""The adapter: a 2-layer MLP with exact GELU from encoder width to decoder embedding width.

Its output vectors are the soft tokens the decoder reads in place of a chunk's text.
"""

import flax.linen as nn
import jax

from e2llm_jax.models import layers


class Adapter(nn.Module):
  hidden_size: int
  output_size: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(self.hidden_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype,
                     name="fc1")(x)
    return layers.Dense(self.output_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype,
                        name="fc2")(layers.gelu_exact(h))
