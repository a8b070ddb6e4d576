"""Flow transformer blocks (docs/method.md#network): RMSNorm, rotary embedding, SwiGLU, timestep embedder, block.

Parameter names follow the published checkpoints (docs/method.md#checkpoint-names). Every parameter carries logical axis
names (`embed`, `qkv`, `heads`, `mlp`, `latent`, `vocab`, ...) that `elf_jax.parallel.sharding` maps to mesh axes.
"""
from collections.abc import Callable
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elf_jax.ops.attention import attention

Dtype = jnp.dtype

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def logical(init: Callable, *names) -> Callable:
  """An initializer whose parameter is annotated with logical axis names (one per dimension)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          kernel_init: Callable = xavier, name: str | None = None) -> nn.Dense:
  """`nn.Dense` with float32 params computed in `dtype`; `axes` names the kernel's (in, out) dimensions (the bias
  takes the out one)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=logical(kernel_init, *axes), bias_init=logical(zeros, axes[1]), name=name)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x², -1) + eps) · weight, computed in float32, returned in the input dtype.

  Not `nn.RMSNorm`: that names its parameter `scale`, the published checkpoints call it `weight`."""
  eps: float = 1e-6
  axis_name: str | None = "norm"

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", logical(ones, self.axis_name), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * weight).astype(x.dtype)


def timestep_features(s: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of a raw scalar per example: (B,) → (B, dim), `dim/2` cosines then `dim/2` sines."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = s.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Scalar (B,) → (B, H): sinusoidal features → Dense(H) → SiLU → Dense(H); kernels init normal(0.02)."""
  hidden_size: int
  frequency_dim: int = 256

  @nn.compact
  def __call__(self, s):
    init = nn.initializers.normal(0.02)
    features = timestep_features(s, self.frequency_dim)
    h = dense(self.hidden_size, ("freq", "embed"), kernel_init=init, name="mlp_0")(features)
    return dense(self.hidden_size, ("mlp", "embed"), kernel_init=init, name="mlp_2")(nn.silu(h))


def rope_tables(positions: np.ndarray, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """Constant (L, 1, D) cos / signed-sin tables of the adjacent-pair rotation for static integer `positions` (L,).

  Pair (2i, 2i+1) turns by angle pos · theta^(-2i/D): cos is repeated over the pair, sin is (−sin, +sin).
  """
  angles = np.asarray(positions, np.float64)[:, None] * theta ** (-np.arange(0, dim, 2) / dim)  # (L, D/2)
  cos = np.repeat(np.cos(angles), 2, axis=-1)
  sin = np.stack([-np.sin(angles), np.sin(angles)], axis=-1).reshape(cos.shape)
  return cos[:, None].astype(np.float32), sin[:, None].astype(np.float32)


def apply_rope(x: jax.Array, positions: np.ndarray, theta: float) -> jax.Array:
  """Rotary embedding with adjacent pairs: dims (2i, 2i+1) rotate by angle pos · theta^(-2i/D).

  x: (B, L, N, D) with D even; positions: (L,) static integers. Computed in float32 as
  x·cos + swap_pairs(x)·sin with constant tables (no per-element trigonometry), returned in x's dtype.
  """
  cos, sin = rope_tables(positions, x.shape[-1], theta)
  x32 = x.astype(jnp.float32)
  swapped = x32.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)  # (x1, x0, x3, x2, ...)
  return (x32 * cos + swapped * sin).astype(x.dtype)


class Attention(nn.Module):
  """Fused-qkv multi-head attention with QK-norm and RoPE on the data tokens only.

  Input (B, L, H) with L = num_prefix + S; the first `num_prefix` tokens (time / guidance / mode) are not rotated.
  """
  num_heads: int
  num_prefix: int
  rope_theta: float
  dtype: Dtype
  attention_impl: str

  @nn.compact
  def __call__(self, x, key_mask):
    b, l, h = x.shape
    d = h // self.num_heads
    qkv = dense(3 * h, ("embed", "qkv"), dtype=self.dtype, name="qkv")(x)
    # Output layout [q | k | v][head][dim].
    q, k, v = (qkv[..., i * h:(i + 1) * h].reshape(b, l, self.num_heads, d) for i in range(3))
    q = RMSNorm(name="q_norm", axis_name="head_dim")(q)
    k = RMSNorm(name="k_norm", axis_name="head_dim")(k)
    # Prefix tokens get angle 0 (the identity rotation); data token j gets position j.
    positions = np.maximum(np.arange(l) - self.num_prefix, 0)
    q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
    out = attention(q, k, v, key_mask, impl=self.attention_impl)
    return dense(h, ("heads", "embed"), dtype=self.dtype, name="proj")(out.reshape(b, l, h))


class SwiGLU(nn.Module):
  """Fused w12 (output [gate | value]) → silu(gate) · value → w3 back to the input width."""
  hidden: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    h = x.shape[-1]
    gate, value = jnp.split(dense(2 * self.hidden, ("embed", "mlp"), dtype=self.dtype, name="w12")(x), 2, axis=-1)
    return dense(h, ("mlp", "embed"), dtype=self.dtype, name="w3")(nn.silu(gate) * value)


class Block(nn.Module):
  """Pre-norm transformer block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), in the shape of a scan body.

  __call__(x, dropout_rate, key_mask) → (x, None): x (B, L, H); dropout_rate: float32 scalar, this block's dropout
  rate (the model scans the blocks, so the rate is data, one per layer); key_mask (B, L) bool. `max_dropout_rate`
  is static: 0 (or `deterministic`) skips dropout entirely.
  """
  num_heads: int
  num_prefix: int
  mlp_hidden: int
  rope_theta: float
  max_dropout_rate: float
  dtype: Dtype
  attention_impl: str
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, dropout_rate, key_mask):
    a = Attention(self.num_heads, self.num_prefix, self.rope_theta, self.dtype, self.attention_impl, name="attn")(
        RMSNorm(name="norm1", axis_name="embed")(x), key_mask)
    x = x + self._dropout(a, dropout_rate)
    m = SwiGLU(self.mlp_hidden, self.dtype, name="mlp")(RMSNorm(name="norm2", axis_name="embed")(x))
    return x + self._dropout(m, dropout_rate), None

  def _dropout(self, x, rate):
    """Inverted dropout at a traced rate: kept entries are scaled by 1 / (1 − rate); rate 0 is the identity."""
    if self.deterministic or self.max_dropout_rate == 0.0:
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))
