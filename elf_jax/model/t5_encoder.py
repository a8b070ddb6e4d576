"""The frozen T5 encoder E (docs/method.md#latents) in Flax (its weights are imported by `elf_jax.weights.encoder`).

  T5Encoder(config, dtype).apply({"params": params}, input_ids (B, S) int32, attention_mask) -> (B, S, D) float32

`make_encoder_mask` builds the (B, S, S) mask; `load_official_t5_encoder` reads the official encoder pickle.
T5 specifics, dtypes and the parameter-name table: docs/model.md#t5-encoder.
"""
from collections.abc import Mapping
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_FEED_FORWARD_PROJ = ("relu", "gated-gelu")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Architecture of a T5 encoder stack; field names follow Hugging Face's `T5Config`."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_kv: int
  d_ff: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_eps: float = 1e-6
  feed_forward_proj: str = "relu"  # relu (T5) | gated-gelu (T5 v1.1, mT5)

  def __post_init__(self):
    if self.feed_forward_proj not in _FEED_FORWARD_PROJ:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; use one of "
                       f"{_FEED_FORWARD_PROJ}")

  @classmethod
  def from_hf_config(cls, hf_config: Any) -> "T5EncoderConfig":
    """From a `transformers.T5Config` or the dict of a Hugging Face `config.json`."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    missing = [k for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff") if get(k) is None]
    if missing:
      raise ValueError(f"T5 config lacks {missing}; is this a T5 config.json?")
    return cls(
        vocab_size=get("vocab_size"), d_model=get("d_model"), num_layers=get("num_layers"),
        num_heads=get("num_heads"), d_kv=get("d_kv"), d_ff=get("d_ff"),
        relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=get("relative_attention_max_distance", 128),
        layer_norm_eps=get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=get("feed_forward_proj", "relu"))


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of `key - query` for a (length, length) grid; int32 in [0, num_buckets).

  Half the buckets hold positive offsets. Within each half, offsets below half of it are exact and the rest are
  log-spaced up to `max_distance`; the float32 arithmetic follows Hugging Face's so boundaries agree bit for bit.
  """
  pos = np.arange(length)
  rel = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  max_exact = half // 2
  dist = np.abs(rel)
  scaled = np.log(np.maximum(dist, max_exact).astype(np.float32) / max_exact)
  large = max_exact + (scaled / math.log(max_distance / max_exact) * (half - max_exact)).astype(np.int64)
  buckets = (rel > 0) * half + np.where(dist < max_exact, dist, np.minimum(large, half - 1))
  return buckets.astype(np.int32)


def make_encoder_mask(valid: jax.Array, cond_mask: jax.Array | None = None,
                      drop_condition: jax.Array | None = None) -> jax.Array:
  """The encoder's (B, S, S) attention mask (docs/method.md#latents); True = query row i may attend key column j.

  Args:
    valid: (B, S) bool, real (non-padding) tokens.
    cond_mask: (B, S) bool, condition positions of a `[condition ; target]` sequence; None = unconditional.
    drop_condition: (B,) bool, examples whose condition is dropped (CFG training); needs `cond_mask`.

  Returns:
    (B, S, S) bool. Columns are always restricted to valid tokens. Unconditional: every row attends to all valid
    columns. Conditional: condition rows attend to valid condition columns; target rows attend to all valid
    columns, or only to valid target columns where `drop_condition`. Rows are classified by `cond_mask` alone,
    so a padding row gets the columns of a real row of its segment (its output is never used, and it keeps
    at least one column whenever its segment has a valid token).
  """
  valid = jnp.asarray(valid, bool)
  cols = jnp.broadcast_to(valid[:, None, :], valid.shape + valid.shape[-1:])
  if cond_mask is None:
    if drop_condition is not None:
      raise ValueError("drop_condition needs cond_mask: only conditional sequences have a condition to drop")
    return cols
  cond = jnp.asarray(cond_mask, bool)
  if cond.shape != valid.shape:
    raise ValueError(f"cond_mask shape {cond.shape} != valid shape {valid.shape}")
  cond_cols = cols & cond[:, None, :]
  target_cols = cols
  if drop_condition is not None:
    drop = jnp.asarray(drop_condition, bool)
    if drop.shape != valid.shape[:1]:
      raise ValueError(f"drop_condition shape {drop.shape} != batch shape {valid.shape[:1]}")
    target_cols = cols & ~(drop[:, None, None] & cond[:, None, :])
  return jnp.where(cond[:, :, None], cond_cols, target_cols)


def _rms_norm(eps: float, name: str) -> nn.RMSNorm:
  """T5's layer norm: RMS norm without mean subtraction or bias, parameter `scale`; (..., D) -> (..., D) float32."""
  return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _dense(features: int, std: float, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(std), name=name)


class T5SelfAttention(nn.Module):
  """Unscaled multi-head attention with an additive position bias; (B, S, D) -> (B, S, D) in `dtype`."""
  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias, mask):
    """x (B, S, D); position_bias (1, H, S, S) float32; mask bool broadcastable to (B, H, S, S)."""
    c = self.config
    inner = c.num_heads * c.d_kv
    heads = lambda y: y.reshape(y.shape[:2] + (c.num_heads, c.d_kv))  # (B, S, H*K) -> (B, S, H, K)
    q = heads(_dense(inner, (c.d_model * c.d_kv) ** -0.5, self.dtype, "q")(x))
    k = heads(_dense(inner, c.d_model ** -0.5, self.dtype, "k")(x))
    v = heads(_dense(inner, c.d_model ** -0.5, self.dtype, "v")(x))
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + position_bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v).reshape(x.shape[:2] + (inner,))
    return _dense(c.d_model, inner ** -0.5, self.dtype, "o")(out)


class T5FeedForward(nn.Module):
  """ReLU FFN `wo(relu(wi x))` or gated-GELU `wo(gelu(wi_0 x) * wi_1 x)`; (B, S, D) -> (B, S, D)."""
  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    if c.feed_forward_proj == "relu":
      h = nn.relu(_dense(c.d_ff, c.d_model ** -0.5, self.dtype, "wi")(x))
    else:  # gated-gelu: Hugging Face's "gelu_new" is the tanh approximation
      gate = nn.gelu(_dense(c.d_ff, c.d_model ** -0.5, self.dtype, "wi_0")(x), approximate=True)
      h = gate * _dense(c.d_ff, c.d_model ** -0.5, self.dtype, "wi_1")(x)
    return _dense(c.d_model, c.d_ff ** -0.5, self.dtype, "wo")(h)


class T5Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + ff(norm(x)); residual stream float32 (B, S, D)."""
  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias, mask):
    eps = self.config.layer_norm_eps
    h = _rms_norm(eps, "attention_norm")(x.astype(jnp.float32)).astype(self.dtype)
    x = x + T5SelfAttention(self.config, self.dtype, name="attention")(h, position_bias, mask).astype(jnp.float32)
    h = _rms_norm(eps, "ff_norm")(x.astype(jnp.float32)).astype(self.dtype)
    return x + T5FeedForward(self.config, self.dtype, name="ff")(h).astype(jnp.float32)


class T5Encoder(nn.Module):
  """T5 encoder stack: token ids (B, S) int32 and a mask -> contextual embeddings (B, S, d_model) float32.

  Attributes:
    config: the architecture.
    dtype: compute dtype of the matmuls (float32 or bfloat16); params, norms, softmax and output stay float32.
  """
  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    """input_ids (B, S) int; attention_mask (B, S, S) or (B, S) key padding, bool or 0/1 ints."""
    c = self.config
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim == 2:
      mask = attention_mask[:, None, None, :]
    elif attention_mask.ndim == 3:
      mask = attention_mask[:, None, :, :]
    else:
      raise ValueError(f"attention_mask must be (B, S, S) or (B, S); got shape {attention_mask.shape}")
    mask = mask.astype(bool)
    seq_len = input_ids.shape[1]
    x = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(1.0), name="shared")(input_ids)
    buckets = relative_position_buckets(seq_len, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    table = nn.Embed(c.relative_attention_num_buckets, c.num_heads,
                     embedding_init=nn.initializers.normal(c.d_model ** -0.5), name="relative_attention_bias")
    position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # (1, H, S, S)
    for i in range(c.num_layers):
      x = T5Block(c, self.dtype, name=f"block_{i}")(x, position_bias, mask)
    return _rms_norm(c.layer_norm_eps, "final_layer_norm")(x.astype(jnp.float32))


def random_t5_encoder_params(config: T5EncoderConfig, seed: int) -> dict:
  """Fixed seeded weights for a T5-architecture encoder, drawn as Hugging Face's T5 init (std 1 embeddings,
  fan-in-scaled projections, unit norms), so outputs are sensibly scaled. Returns the float32 `params` tree."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return T5Encoder(config).init(jax.random.key(seed), ids, jnp.ones((1, 1), bool))["params"]
