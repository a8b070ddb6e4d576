"""GPT-2 causal language model in Flax (linen) and import of Hugging Face GPT-2 checkpoints (docs/method.md#evaluation).

The network matches Hugging Face's `GPT2LMHeadModel`; pad on the right. Import layout and the parameter tree:
docs/model.md#gpt-2-scorer.
"""
import dataclasses
import functools
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elf_jax import hub
from elf_jax.weights import hf

# Hugging Face `activation_function` names -> Flax functions. gelu_new is the tanh approximation.
_ACTIVATIONS = {
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
}
# Checkpoint entries that are not weights: causal-mask buffers of older GPT-2 checkpoints.
_BUFFER_KEY = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 shapes, named as in Hugging Face's config.json (defaults: GPT-2 small)."""
  vocab_size: int = 50257
  n_positions: int = 1024  # longest sequence the position table covers
  n_embd: int = 768  # E
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # MLP width I; None = 4 E
  layer_norm_epsilon: float = 1e-5
  activation_function: str = "gelu_new"

  def __post_init__(self):
    if self.activation_function not in _ACTIVATIONS:
      raise ValueError(f"GPT-2 activation_function={self.activation_function!r} is not supported; "
                       f"use one of {sorted(_ACTIVATIONS)}")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT-2 n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

  @property
  def mlp_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any]) -> "GPT2Config":
    """Reads a Hugging Face GPT-2 config.json dict; rejects variants this network does not implement."""
    unsupported = {
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "add_cross_attention": (hf.get("add_cross_attention", False), False),
    }
    bad = [f"{k}={got}" for k, (got, want) in unsupported.items() if got != want]
    if bad:
      raise ValueError(f"GPT-2 config options not supported by elf_jax.eval.gpt2: {', '.join(bad)}")
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: hf[k] for k in names if k in hf})


class _Attention(nn.Module):
  """Causal multi-head self-attention; scores, mask and softmax in float32."""
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    """x: (B,T,E); mask: (B,1,T,T) bool, True where a query may attend to a key. Returns (B,T,E)."""
    cfg = self.config
    batch, length, _ = x.shape
    head_dim = cfg.n_embd // cfg.n_head
    qkv = nn.Dense(3 * cfg.n_embd, dtype=self.dtype, name="c_attn")(x)
    q, k, v = (a.reshape(batch, length, cfg.n_head, head_dim) for a in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # finite: a fully masked row stays NaN-free
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, cfg.n_embd)
    return nn.Dense(cfg.n_embd, dtype=self.dtype, name="c_proj")(out)


class _MLP(nn.Module):
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    """x: (B,T,E) -> (B,T,E)."""
    h = nn.Dense(self.config.mlp_dim, dtype=self.dtype, name="c_fc")(x)
    h = _ACTIVATIONS[self.config.activation_function](h)
    return nn.Dense(self.config.n_embd, dtype=self.dtype, name="c_proj")(h)


class _Block(nn.Module):
  """Pre-LayerNorm transformer block; the residual stream stays float32."""
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    eps = self.config.layer_norm_epsilon
    x = x + _Attention(self.config, self.dtype, name="attn")(nn.LayerNorm(eps, name="ln_1")(x), mask)
    return x + _MLP(self.config, self.dtype, name="mlp")(nn.LayerNorm(eps, name="ln_2")(x))


class GPT2LMHeadModel(nn.Module):
  """GPT-2 language model. `dtype` is the compute dtype of matmuls (float32 or bfloat16); params are float32."""
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               hidden_states: bool = False) -> jax.Array:
    """Next-token logits, or the last hidden states.

    Args:
      input_ids: (B,T) int token ids, T <= n_positions.
      attention_mask: (B,T), nonzero for real tokens (right padding); None = all real.
      hidden_states: return the final layer norm's output instead of the logits (Hugging Face's
        `hidden_states[-1]`, which MAUVE's featurizer reads).

    Returns:
      (B,T,V) float32 logits, row t predicting token t+1; or with hidden_states, (B,T,E) float32.
    """
    cfg = self.config
    length = input_ids.shape[1]
    if length > cfg.n_positions:
      raise ValueError(f"sequence length {length} exceeds GPT-2's n_positions={cfg.n_positions}; truncate it")
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe")
    x = wte(input_ids) + wpe(jnp.arange(length))[None]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask != 0)[:, None, None, :]
    for i in range(cfg.n_layer):
      x = _Block(cfg, self.dtype, name=f"h_{i}")(x, mask)
    x = nn.LayerNorm(cfg.layer_norm_epsilon, name="ln_f")(x)
    if hidden_states:
      return x.astype(jnp.float32)
    logits = jnp.einsum("bte,ve->btv", x.astype(self.dtype), wte.embedding.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return logits


def param_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened parameter path -> shape of `GPT2LMHeadModel(config)`, without allocating weights."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  tree = jax.eval_shape(lambda i: GPT2LMHeadModel(config).init(jax.random.key(0), i), ids)["params"]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _flax_path(hf_name: str) -> tuple[str, ...]:
  """'h.3.mlp.c_fc.weight' -> ('h_3', 'mlp', 'c_fc', 'kernel'); 'wte.weight' -> ('wte', 'embedding')."""
  parts = hf_name.split(".")
  if parts[0] == "h" and len(parts) > 1:
    parts = [f"h_{parts[1]}"] + parts[2:]
  if parts[-1] == "weight" and len(parts) > 1:
    module = parts[-2]
    parts[-1] = "embedding" if module in ("wte", "wpe") else "scale" if module.startswith("ln_") else "kernel"
  return tuple(parts)


def convert_hf_state_dict(config: GPT2Config, state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Hugging Face GPT-2 weights (names as in GPT2LMHeadModel or GPT2Model) -> Flax params tree (float32).

  Raises:
    ValueError listing every missing, unexpected and mis-shaped weight (and an untied lm_head) at once.
  """
  expected = param_shapes(config)
  problems, flat, seen = [], {}, set()
  lm_head = None
  for name, value in state.items():
    short = name.removeprefix("transformer.")
    if _BUFFER_KEY.search(short):
      continue
    if short == "lm_head.weight":
      lm_head = value
      continue
    path = _flax_path(short)
    seen.add(path)
    if path not in expected:
      problems.append(f"unexpected weight {name} {tuple(value.shape)}")
    elif tuple(value.shape) != expected[path]:
      problems.append(f"mis-shaped weight {name}: {tuple(value.shape)}, expected {expected[path]}")
    else:
      flat[path] = np.asarray(value, np.float32)
  problems += [f"missing weight for {'/'.join(p)} {s}" for p, s in expected.items() if p not in seen]
  wte = flat.get(("wte", "embedding"))
  if lm_head is not None and wte is not None and not np.array_equal(np.asarray(lm_head, np.float32), wte):
    problems.append("lm_head.weight differs from transformer.wte.weight: only tied GPT-2 readouts are supported")
  if problems:
    raise ValueError(f"GPT-2 checkpoint does not match the config ({config}):\n  " + "\n  ".join(problems))
  params = {}
  for path, value in flat.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return params


def read_hf_state_dict(directory: pathlib.Path | str) -> dict[str, np.ndarray]:
  """Every weight of a Hugging Face GPT-2 directory (safetensors or pytorch .bin, single or sharded), float32."""
  return hf.read_state_dict(directory, what="GPT-2")


def load_hf_gpt2(name_or_path: str) -> tuple[GPT2Config, dict[str, Any]]:
  """Loads a Hugging Face GPT-2 checkpoint (local directory or hub id) as (config, Flax params tree)."""
  directory = hub.resolve_dir(name_or_path, "GPT-2", ["config.json"], field="eval.gpt2")
  config = GPT2Config.from_hf_dict(hf.read_config(directory))
  return config, convert_hf_state_dict(config, read_hf_state_dict(directory))
