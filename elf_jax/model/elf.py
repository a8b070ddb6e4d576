"""The ELF flow transformer (docs/method.md#network): one network for denoising (x̂) and decoding (token logits).

`ELF` maps (x, t, w) to x̂ or logits (`decode`); `stack_blocks` / `unstack_blocks` convert the stacked blocks
from / to the published `blocks_{i}/...` names. Data flow, the `decode` flag and parameter names:
docs/model.md#flow-transformer.
"""
from collections.abc import Mapping
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elf_jax.config import BLOCK_LOOPS, REMAT_POLICIES, base_config, check_choice
from elf_jax.model import layers

BLOCKS = "blocks"  # the stacked blocks: every leaf has a leading layer axis (logical axis "layers")
BLOCK_PREFIX = "blocks_"  # published checkpoints name block i `blocks_{i}` (docs/method.md#checkpoint-names)
# jax.checkpoint policy of each of config.REMAT_POLICIES (none: no rematerialisation).
_CHECKPOINT_POLICIES = dict(zip(REMAT_POLICIES, (None, jax.checkpoint_policies.nothing_saveable,
                                                 jax.checkpoint_policies.dots_with_no_batch_dims_saveable)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Static hyper-parameters of the flow transformer, built by `from_config` (the values, their meaning and their
  defaults are those of `config.model` in `elf_jax.config.base_config()`; defaults live only there). `latent_dim`
  is C, the frozen encoder's width (`config.encoder.dim`); `mlp_hidden` the SwiGLU hidden width (None = derived
  from `mlp_ratio`: floor(floor(mlp_ratio · H) · 2 / 3)).
  """
  latent_dim: int
  hidden_size: int
  depth: int
  num_heads: int
  bottleneck_dim: int
  vocab_size: int
  mlp_ratio: float
  mlp_hidden: int | None = None
  num_time_tokens: int
  num_guidance_tokens: int
  num_mode_tokens: int
  rope_theta: float
  dropout_rate: float
  compute_dtype: str  # float32 | bfloat16
  attention_impl: str  # xla | pallas | auto
  remat: str  # one of config.REMAT_POLICIES
  block_loop: str  # one of config.BLOCK_LOOPS

  @property
  def num_prefix(self) -> int:
    return self.num_time_tokens + self.num_guidance_tokens + self.num_mode_tokens

  @property
  def swiglu_hidden(self) -> int:
    return self.mlp_hidden or int(int(self.mlp_ratio * self.hidden_size) * 2 / 3)

  @classmethod
  def from_params(cls, params, **overrides) -> "ModelConfig":
    """Every dimension read off a parameter tree, published (docs/method.md#checkpoint-names) or stacked."""
    p = stack_blocks(nn.unbox(params))
    hidden, blocks = p["t_emb_tokens"].shape[-1], p[BLOCKS]
    dims = dict(
        latent_dim=p["self_cond_proj"]["kernel"].shape[1], hidden_size=hidden, depth=blocks["norm1"]["weight"].shape[0],
        num_heads=hidden // blocks["attn"]["q_norm"]["weight"].shape[1],
        bottleneck_dim=p["text_proj"]["proj1"]["kernel"].shape[1], vocab_size=p["unembed_kernel"].shape[1],
        mlp_hidden=blocks["mlp"]["w3"]["kernel"].shape[1], num_time_tokens=p["t_emb_tokens"].shape[1],
        num_guidance_tokens=p["self_cond_cfg_tokens"].shape[1], num_mode_tokens=p["mode_tokens"].shape[1])
    return cls.from_config(base_config(), **{**dims, **overrides})

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> "ModelConfig":
    """Builds the model config from a full run config (`config.model` plus `config.encoder.dim`); `overrides` replace
    fields, e.g. `ModelConfig.from_config(base_config(), depth=2)` for the defaults with a change."""
    m = config.model
    fields = dict(latent_dim=config.encoder.dim, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
                  bottleneck_dim=m.bottleneck_dim, vocab_size=m.vocab_size, mlp_ratio=m.mlp_ratio,
                  num_time_tokens=m.num_time_tokens, num_guidance_tokens=m.num_guidance_tokens,
                  num_mode_tokens=m.num_mode_tokens, rope_theta=m.rope_theta, dropout_rate=m.dropout_rate,
                  compute_dtype=m.compute_dtype, attention_impl=m.attention_impl, remat=m.remat,
                  block_loop=m.block_loop)
    return cls(**{**fields, **overrides})


class FinalLayer(nn.Module):
  """RMSNorm → Dense(H → C), zero-initialised."""
  latent_dim: int

  @nn.compact
  def __call__(self, h):
    h = layers.RMSNorm(name="norm_final", axis_name="embed")(h)
    return layers.dense(self.latent_dim, ("embed", "latent"), kernel_init=layers.zeros, name="linear")(h)


class ELF(nn.Module):
  """The flow transformer.

  __call__(x, t, w, mask=None, *, decode=False, deterministic=True):
    x: (B, S, 2C) float, concat[z, x_sc]; t: (B,) time in [0, 1]; w: (B,) guidance scale;
    mask: (B, S) padding mask (1/True = valid) or None; decode: static bool, or a (B,) per-example mode-token gate.
    Returns x̂ (B, S, C) float32 if decode is False, logits (B, S, V) float32 if True, (x̂, logits) for a gate.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, t, w, mask=None, *, decode: bool = False, deterministic: bool = True):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    b, s, _ = x.shape
    hsize = cfg.hidden_size
    token_init = layers.logical(nn.initializers.normal(0.02), None, None, "embed")

    x = layers.dense(cfg.latent_dim, ("latent2", "latent"), dtype=dtype, name="self_cond_proj")(x.astype(dtype))
    h = TextProj(cfg.bottleneck_dim, hsize, dtype, name="text_proj")(x)

    time_tokens = self.param("t_emb_tokens", token_init, (1, cfg.num_time_tokens, hsize), jnp.float32)
    time_tokens = time_tokens + layers.TimestepEmbedder(hsize, name="t_embedder")(t)[:, None]
    guide_tokens = self.param("self_cond_cfg_tokens", token_init, (1, cfg.num_guidance_tokens, hsize), jnp.float32)
    guide_tokens = guide_tokens + layers.TimestepEmbedder(hsize, name="self_cond_cfg_embedder")(w)[:, None]
    mode_tokens = self.param("mode_tokens", token_init, (1, cfg.num_mode_tokens, hsize), jnp.float32)
    gated = not isinstance(decode, bool)  # a per-example gate: both heads
    mode_tokens = mode_tokens * (jnp.asarray(decode, jnp.float32).reshape(b, 1, 1) if gated else float(decode))
    prefix = jnp.concatenate([time_tokens, guide_tokens, jnp.broadcast_to(mode_tokens, (b,) + mode_tokens.shape[1:])],
                             axis=1)
    h = jnp.concatenate([prefix.astype(dtype), h.astype(dtype)], axis=1)  # (B, P + S, H)

    data_mask = jnp.ones((b, s), bool) if mask is None else mask.astype(bool)
    key_mask = jnp.concatenate([jnp.ones((b, cfg.num_prefix), bool), data_mask], axis=1)

    h = self._blocks(h, key_mask, dtype, deterministic)
    h = h[:, cfg.num_prefix:].astype(jnp.float32)  # data positions (B, S, H)

    want_latent = gated or not decode or self.is_initializing()
    want_logits = gated or decode or self.is_initializing()
    x_hat = FinalLayer(cfg.latent_dim, name="final_layer")(h) if want_latent else None
    logits = self._readout(h) if want_logits else None
    if gated:
      return x_hat, logits
    return logits if decode else x_hat

  def _blocks(self, h, key_mask, dtype, deterministic):
    """The `depth` blocks on h (B, P + S, H); their parameters are always one stacked `blocks` tree (made by an
    `nn.scan` at init). `block_loop` "scan" runs them in that scan; "unrolled" applies the same block module to each
    layer's slice of the stacked parameters in turn (docs/model.md#block-loop)."""
    cfg = self.config
    check_choice("model.remat", cfg.remat, REMAT_POLICIES)
    check_choice("model.block_loop", cfg.block_loop, BLOCK_LOOPS)
    policy = _CHECKPOINT_POLICIES[cfg.remat]
    block_cls = layers.Block if policy is None else nn.remat(layers.Block, policy=policy)
    block_args = (cfg.num_heads, cfg.num_prefix, cfg.swiglu_hidden, cfg.rope_theta, cfg.dropout_rate, dtype,
                  cfg.attention_impl, deterministic)
    rates = layer_dropout_rates(cfg)
    if cfg.block_loop == "scan" or self.is_initializing():
      blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(0, nn.broadcast), length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      return blocks(*block_args, name=BLOCKS)(h, rates, key_mask)[0]
    # lax.split cuts each stacked leaf along the layer axis in one op; its transpose concatenates the per-layer
    # gradients once (no stacked residual buffers, no per-layer dynamic slices).
    leaves, tree = jax.tree.flatten(nn.unbox(self.variables["params"][BLOCKS]))
    per_layer = [jax.lax.split(leaf, (1,) * cfg.depth) for leaf in leaves]
    block = block_cls(*block_args, parent=None)  # a free module, applied to one layer's parameters at a time
    dropout = not deterministic and cfg.dropout_rate > 0
    dropout_rng = self.make_rng("dropout") if dropout else None
    for i in range(cfg.depth):
      params = tree.unflatten([parts[i][0] for parts in per_layer])
      rngs = {"dropout": jax.random.fold_in(dropout_rng, i)} if dropout else None
      h, _ = block.apply({"params": params}, h, rates[i], key_mask, rngs=rngs)
    return h

  def _readout(self, h):
    """Factored unembedding: gelu(h W1 + b1) W2 + b2, (B, S, H) → (B, S, V)."""
    cfg = self.config
    w1 = self.param("proj_kernel", layers.logical(layers.xavier, "embed", "latent"), (cfg.hidden_size, cfg.latent_dim))
    b1 = self.param("proj_bias", layers.logical(layers.zeros, "latent"), (cfg.latent_dim,))
    w2 = self.param("unembed_kernel", layers.logical(layers.xavier, "latent", "vocab"),
                    (cfg.latent_dim, cfg.vocab_size))
    b2 = self.param("unembed_bias", layers.logical(layers.zeros, "vocab"), (cfg.vocab_size,))
    return nn.gelu(h @ w1 + b1) @ w2 + b2


class TextProj(nn.Module):
  """Bottleneck: proj1 (C → bottleneck, no bias) → proj2 (bottleneck → H)."""
  bottleneck_dim: int
  hidden_size: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.bottleneck_dim, ("latent", "bottleneck"), use_bias=False, dtype=self.dtype, name="proj1")(x)
    return layers.dense(self.hidden_size, ("bottleneck", "embed"), dtype=self.dtype, name="proj2")(x)


def layer_dropout_rates(cfg: ModelConfig) -> jax.Array:
  """(depth,) float32 dropout rate per block: `dropout_rate` in the middle half of the blocks, 0 elsewhere."""
  layer = np.arange(cfg.depth)
  middle = (layer >= cfg.depth // 4) & (layer < cfg.depth - cfg.depth // 4)
  return jnp.asarray(np.where(middle, cfg.dropout_rate, 0.0), jnp.float32)


def _is_published_block(key) -> bool:
  return isinstance(key, str) and key.startswith(BLOCK_PREFIX) and key[len(BLOCK_PREFIX):].isdigit()


def stack_blocks(params: Mapping) -> dict:
  """Published layout → ours: `blocks_{i}/...` (docs/method.md#checkpoint-names) become one `blocks/...` tree.

  Leaves may be numpy (stacked with numpy) or jax arrays. A tree that is already stacked is returned as is.
  """
  params = dict(params)
  published = sorted((k for k in params if _is_published_block(k)), key=lambda k: int(k[len(BLOCK_PREFIX):]))
  if not published:
    return params
  if BLOCKS in params or [int(k[len(BLOCK_PREFIX):]) for k in published] != list(range(len(published))):
    raise ValueError(f"cannot stack blocks {published} (with {BLOCKS!r} present: {BLOCKS in params}): expected "
                     f"{BLOCK_PREFIX}0 ... {BLOCK_PREFIX}{{depth - 1}} and no {BLOCKS!r} entry")
  per_layer = [params.pop(k) for k in published]
  stack = lambda *xs: np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)
  params[BLOCKS] = jax.tree.map(stack, *per_layer)
  return params


def unstack_blocks(params: Mapping) -> dict:
  """Ours → published layout: stacked `blocks/...` become `blocks_{i}/...` (docs/method.md#checkpoint-names).

  A tree without `blocks` is returned as is (for shapes only, use `jax.eval_shape(unstack_blocks, tree)`).
  """
  params = dict(params)
  if BLOCKS not in params:
    return params
  stacked = params.pop(BLOCKS)
  depth = jax.tree.leaves(stacked)[0].shape[0]
  params.update({f"{BLOCK_PREFIX}{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)})
  return params


def init_params(model: ELF, rng: jax.Array, seq_len: int = 8):
  """Initialises every parameter (denoiser and readout heads). Returns the boxed tree (LogicallyPartitioned leaves)."""
  c = model.config.latent_dim
  x = jnp.zeros((1, seq_len, 2 * c), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,)), jnp.ones((1,)))["params"]


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(nn.unbox(params)))
