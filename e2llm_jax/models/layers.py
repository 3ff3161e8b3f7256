"""Building blocks shared by the towers: a LoRA-aware Dense, norms, activations, attention, and
how a tower repeats its layer (scanned over stacked params or unrolled, rematerialised or not).

Every kernel is created with logical axis names so the sharding rules in the config place it.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e2llm_jax.models import attention as attention_lib
from e2llm_jax.models import packing, stacking

Dtype = Any
LORA_COLLECTION = "lora"


def _times_derivative(g: jax.Array, x: jax.Array, derivative: Callable[[jax.Array], jax.Array]):
  return (g.astype(jnp.float32) * derivative(x.astype(jnp.float32))).astype(g.dtype)


def _with_recomputed_derivative(fn: Callable[[jax.Array], jax.Array],
                                derivative: Callable[[jax.Array], jax.Array]):
  """`fn` whose backward keeps only its input and multiplies by `derivative(x)` (float32).

  Autodiff of the plain activations keeps several [tokens, mlp] intermediates per layer instead,
  and moving them cost MiniLM's forward + backward 12% (SmolLM2's 6%) and 17% of the train step's
  peak memory on CPU (bench/RESULTS.md). Same values; gradients as torch autograd's
  (tests/test_models_parity.py). Forward-mode differentiation (jax.jvp) does not go through it.
  """
  wrapped = jax.custom_vjp(fn)

  def grad(packed_x, g):
    return (_times_derivative(g, packing.unpack(packed_x), derivative),)

  wrapped.defvjp(lambda x: (fn(x), packing.pack(x)), grad)
  return wrapped


def _gated_with_recomputed_derivative(fn: Callable[[jax.Array], jax.Array],
                                      derivative: Callable[[jax.Array], jax.Array]):
  """`(gate, up) → fn(gate) * up` whose backward keeps only gate and up and recomputes fn(gate):
  autodiff would keep fn(gate) as a third [tokens, mlp] array per layer. Same gradients as
  autodiff through `_with_recomputed_derivative(fn)`."""
  @jax.custom_vjp
  def gated(gate, up):
    return fn(gate) * up

  def grad(packed, g):
    gate, up = packing.unpack(packed)
    return _times_derivative(g * up, gate, derivative), g * fn(gate)

  gated.defvjp(lambda gate, up: (gated(gate, up), packing.pack((gate, up))), grad)
  return gated


def _gelu_derivative(x):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))
  return cdf + x * jnp.exp(-0.5 * x * x) * 0.3989422804014327  # Φ(x) + x φ(x); 1/√(2π)


def _silu_derivative(x):
  sig = jax.nn.sigmoid(x)
  return sig * (1.0 + x * (1.0 - sig))


def _gelu_erf(x):
  # x Φ(x) through erf in float32, rounded once, as PyTorch computes it. jax.nn.gelu's exact
  # form goes through erfc, whose expansion cost a GPU 1.2 ms per GTE-large layer at 64k tokens
  # (more than the matmul before it) and a CPU 1.2-3.7x this form's time.
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * 0.7071067811865476))).astype(x.dtype)


# The exact (erf) GELU, HF's "gelu"; jax.nn.gelu defaults to the tanh approximation.
_GELU, _SILU = (_gelu_erf, _gelu_derivative), (jax.nn.silu, _silu_derivative)
gelu_exact = _with_recomputed_derivative(*_GELU)
silu = _with_recomputed_derivative(*_SILU)
# Their gated products, keyed by the activation itself so that its every name finds them.
_GATED = {gelu_exact: _gated_with_recomputed_derivative(*_GELU),
          silu: _gated_with_recomputed_derivative(*_SILU)}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": silu,
    "swish": silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def gated_activation(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(gate, up) → activation(name)(gate) * up`, the gated MLP's product."""
  act = activation(name)
  return _GATED.get(act, lambda gate, up: act(gate) * up)


def matmul(x: jax.Array, w: jax.Array | packing.Packed, out_dtype=None) -> jax.Array:
  """`x @ w`, w cast to x's dtype, accumulated in float32 and returned in x's dtype (as HF does)
  or in `out_dtype`. A packed `w` is a frozen kernel sliced from a layer stack (`scanned`): it
  gets no gradient.

  On CPU a bfloat16 dot is asked for a float32 result, then rounded: XLA:CPU runs bf16 x bf16 ->
  f32 dots 2-4x faster than bf16 -> bf16 ones, through AMX or AVX512-BF16 (bench/RESULTS.md).
  GPUs and TPUs accumulate in float32 anyway, and there a float32 result only doubles the bytes
  written and read again: plain bf16 dots ran GTE-large 9% faster on an H200.
  """
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if x.dtype == jnp.float32 or jax.default_backend() != "cpu":
    return jnp.matmul(x, packing.unpack(w).astype(x.dtype), preferred_element_type=out_dtype)
  return _cpu_low_precision_matmul(x, w, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_low_precision_matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
  """A CPU bf16 matmul whose backward dots are bf16 x bf16 -> f32 as well: autodiff's own
  transposes multiply the float32 cotangent by a bf16 operand, which XLA:CPU widens to a float32
  dot.

  It keeps x packed (`packing`), so that a layer scan stacks it in place, and w as the caller
  gave it, before the cast: a layer's slice of a stacked parameter, which the scan then passes to
  the backward instead of stacking a copy of every weight (4% of the bf16 train step).
  """
  return jnp.matmul(x, packing.unpack(w).astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _cpu_matmul_forward(x, w, out_dtype):
  return _cpu_low_precision_matmul(x, w, out_dtype), (packing.pack(x), w)


def _cpu_matmul_backward(out_dtype, residuals, d_y):
  packed_x, w = residuals
  x = packing.unpack(packed_x)
  d_y = d_y.astype(x.dtype)
  d_x = jnp.matmul(d_y, packing.unpack(w).astype(x.dtype).T, preferred_element_type=jnp.float32)
  if isinstance(w, packing.Packed):
    return d_x.astype(x.dtype), packing.Packed(np.zeros(w.bits.shape, jax.dtypes.float0), w.dtype)
  batch_axes = tuple(range(x.ndim - 1))
  d_w = jax.lax.dot_general(x, d_y, ((batch_axes, batch_axes), ((), ())),
                            preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


_cpu_low_precision_matmul.defvjp(_cpu_matmul_forward, _cpu_matmul_backward)


class Dense(nn.Module):
  """`x @ kernel (+ bias)`, plus `dropout(x) @ a @ b` when the `lora` collection holds this path.

  The LoRA factors arrive already multiplied by their scale (see `lora.scaled`), so this module
  needs no LoRA settings besides the dropout rate.
  """
  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora_dropout: float = 0.0
  init_std: float = 0.02  # random init only (HF `initializer_range`); pretrained weights replace it

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = matmul(x, kernel)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable(LORA_COLLECTION, "a"):
      a = self.get_variable(LORA_COLLECTION, "a")
      b = self.get_variable(LORA_COLLECTION, "b")
      lora_in = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic or self.lora_dropout == 0)
      y = y + matmul(matmul(lora_in, a), b)
    return y


class RMSNorm(nn.Module):
  """Llama RMSNorm, computed in float32 as HF does, cast back to the input dtype."""
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts the normalised values back before the weight multiply; same in float32, closer in bf16.
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (BERT post-norm, pooling head)."""
  eps: float = 1e-12
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class Embed(nn.Module):
  """Token (or position) embedding table with logical axes `(vocab, embed)`."""
  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None] = ("vocab", "embed")
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Float32 logits against the table (tied output head)."""
    return matmul(x, self.embedding.T, jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str = "auto",
              block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Softmax attention. q [B,T,N,H], k/v [B,S,K,H] (K divides N); `mask` an
  `attention.AttentionMask` or a dense bool [B,1|N,T,S]. See `attention.attention` for the kernels.
  """
  return attention_lib.attention(q, k, v, mask, implementation, block_q, block_k)


def layer_class(layer_cls: type[nn.Module], remat_policy: str | None, static_argnums: tuple[int, ...],
                scanned: bool) -> type[nn.Module]:
  """`layer_cls`, rematerialised with the named `jax.checkpoint_policies` policy when one is given."""
  if remat_policy is None:
    return layer_cls
  # Under scan, CSE cannot merge the recomputation into the forward, so its guard only costs.
  return nn.remat(layer_cls, static_argnums=static_argnums, prevent_cse=not scanned,
                  policy=getattr(jax.checkpoint_policies, remat_policy))


def scanned(layer_cls: type[nn.Module], num_layers: int, in_axes: tuple,
            initializing: bool = False) -> type[nn.Module]:
  """One module applying `layer_cls` `num_layers` times under `lax.scan`: its params (and LoRA)
  stacked on a leading `layers` logical axis, so the step compiles one layer whatever the depth.
  The layer maps (carry, *args) → (carry, per-layer output); `in_axes` says which args are per layer
  (0) and which every layer shares (`nn.broadcast`). Pass the caller's `is_initializing()`: its
  frozen kernels are read packed (`packing`) except while they are being created."""
  scan = nn.scan(layer_cls, variable_axes={"params": 0, LORA_COLLECTION: 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  if initializing:
    return scan
  # XLA:CPU slices a 16-bit float stack by widening all of it to float32 before the loop and each
  # slice back inside it; the same bits as uint16 are sliced as they are, and `matmul` keeps the
  # packed slice for its backward (bench/RESULTS.md, 2026-12-07). Packing here copies every stack
  # on every call; `kernels_at_rest` does it once, and then this finds them packed already.
  return nn.map_variables(scan, "params", trans_in_fn=_packed_kernels)


def _packed_kernels(params: Any) -> Any:
  """`params` with each 16-bit float kernel packed (`packing.pack`); the rest as it is."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {path: packing.pack(leaf) if path[-1] == "kernel" else leaf for path, leaf in flat.items()})


def kernels_at_rest(params: Any) -> Any:
  """A tower's params with the 16-bit kernels of its layer stack held packed, as `scanned` reads
  them, so that jitted calls taking them no longer copy every stack on every call (bf16 SmolLM2
  decoding took 0.52x the time a token, 0.73x with huge pages; bench/RESULTS.md, 2026-12-08). A
  new tree: the caller drops the old one, or holds both. The same arrays for float32, off the CPU
  and for unrolled layers."""
  name = stacking.stack_name(params)
  return params if name is None else {**params, name: _packed_kernels(params[name])}
