"""The frozen T5 encoder E (docs/method.md#latents) in Flax, with Hugging Face weight import (#checkpoint-names).

Shapes: B batch, S sequence length, D = d_model (the latent width C), H heads, K = d_kv, F = d_ff, V vocab.

    T5Encoder(config, dtype).apply({"params": params}, input_ids (B, S) int32, attention_mask) -> (B, S, D) float32

`attention_mask` is either the full (B, S, S) mask (query row i may attend key column j iff mask[b, i, j]) built
by `make_encoder_mask`, or a (B, S) key-padding mask that every row shares. T5 specifics: no 1/sqrt(K) score
scaling, bidirectional relative-position buckets computed once and shared by all layers, RMS-style layer norm
(no mean subtraction, no bias), pre-norm residual blocks, a final layer norm, ReLU (or T5 v1.1 gated-GELU) FFN.
Parameters are float32; `dtype` is the matmul compute dtype; layer norms, softmax and the residual stream stay
float32. A row whose mask is all False attends uniformly to every column (as Hugging Face's additive mask does)
and yields finite values.

Parameter tree (`params`, without the outer {"params": ...}), with the Hugging Face name each comes from:
    shared/embedding (V, D)                          shared.weight (or encoder.embed_tokens.weight, its tied copy)
    relative_attention_bias/embedding (32, H)        encoder.block.0.layer.0.SelfAttention.relative_attention_bias
    block_{i}/attention_norm/scale (D,)              encoder.block.{i}.layer.0.layer_norm
    block_{i}/attention/{q,k,v}/kernel (D, H*K)      encoder.block.{i}.layer.0.SelfAttention.{q,k,v}  (transposed)
    block_{i}/attention/o/kernel (H*K, D)            encoder.block.{i}.layer.0.SelfAttention.o        (transposed)
    block_{i}/ff_norm/scale (D,)                     encoder.block.{i}.layer.1.layer_norm
    block_{i}/ff/{wi | wi_0, wi_1}/kernel (D, F)     encoder.block.{i}.layer.1.DenseReluDense.*       (transposed)
    block_{i}/ff/wo/kernel (F, D)                    encoder.block.{i}.layer.1.DenseReluDense.wo      (transposed)
    final_layer_norm/scale (D,)                      encoder.final_layer_norm
The relative-attention table sits at the top level rather than in block 0 because every block uses it.

`load_official_t5_encoder` reads the official ELF encoder pickle (the published `t5_small_encoder_jax.pkl`), whose
Flax module names the same weights `shared/embedding`, `encoder/block_{i}/layer_0/{layer_norm/weight,
SelfAttention/{q,k,v,o}/kernel}`, `encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding`,
`encoder/block_{i}/layer_1/{layer_norm/weight, DenseReluDense/*/kernel}`, `encoder/final_layer_norm/weight`, in
our (in, out) kernel layout.
"""
import dataclasses
import math
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elf_jax import hf_weights

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


class T5LayerNorm(nn.Module):
  """RMS norm without mean subtraction or bias; (..., D) -> (..., D) float32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


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
    h = T5LayerNorm(eps, name="attention_norm")(x).astype(self.dtype)
    x = x + T5SelfAttention(self.config, self.dtype, name="attention")(h, position_bias, mask).astype(jnp.float32)
    h = T5LayerNorm(eps, name="ff_norm")(x).astype(self.dtype)
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
    return T5LayerNorm(c.layer_norm_eps, name="final_layer_norm")(x)


def random_t5_encoder_params(config: T5EncoderConfig, seed: int) -> dict:
  """Fixed seeded weights for a T5-architecture encoder, drawn as Hugging Face's T5 init (std 1 embeddings,
  fan-in-scaled projections, unit norms), so outputs are sensibly scaled. Returns the float32 `params` tree."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return T5Encoder(config).init(jax.random.key(seed), ids, jnp.ones((1, 1), bool))["params"]


# --------------------------------------------------------------------------------------------------------------
# Hugging Face weight import.

def _hf_name(path: tuple[str, ...]) -> str:
  """Hugging Face state-dict key of a Flax param path (see the module docstring)."""
  top = path[0]
  if top == "shared":
    return "shared.weight"
  if top == "relative_attention_bias":
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  if top == "final_layer_norm":
    return "encoder.final_layer_norm.weight"
  i = int(top.removeprefix("block_"))
  sub = {"attention_norm": "layer.0.layer_norm", "attention": "layer.0.SelfAttention",
         "ff_norm": "layer.1.layer_norm", "ff": "layer.1.DenseReluDense"}[path[1]]
  proj = f".{path[2]}" if path[1] in ("attention", "ff") else ""
  return f"encoder.block.{i}.{sub}{proj}.weight"


def load_hf_t5_encoder(name_or_path: str) -> tuple[T5EncoderConfig, dict]:
  """Config and float32 `params` of the encoder of a Hugging Face T5 checkpoint.

  Args:
    name_or_path: a local directory with config.json and model.safetensors (possibly sharded) or pytorch_model.bin,
      or a hub id (needs a connection or the hub cache). `T5EncoderModel`, `T5Model` and
      `T5ForConditionalGeneration` checkpoints all work: only `shared.weight` and `encoder.*` are read.

  Raises:
    ValueError listing every missing, unexpected or mis-shaped encoder weight.
  """
  directory = hf_weights.resolve_dir(name_or_path, "T5", ["config.json"], field="encoder.name_or_path")
  config = T5EncoderConfig.from_hf_config(hf_weights.read_config(directory))
  tensors = hf_weights.read_state_dict(directory, keep=lambda key: key.startswith(("shared.", "encoder.")))
  tied = tensors.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; older files keep only this one
  if "shared.weight" not in tensors and tied is not None:
    tensors["shared.weight"] = tied

  return config, _params_from_named(config, tensors, _hf_name, transpose_kernels=True,
                                    source=f"T5 checkpoint {name_or_path!r} does not match its config.json")


def _params_from_named(config: T5EncoderConfig, tensors: dict[str, np.ndarray],
                       name_of: Callable[[tuple[str, ...]], str], transpose_kernels: bool, source: str) -> dict:
  """Our float32 `params` tree for `config`, each leaf taken from `tensors[name_of(path)]` (consumed).

  `transpose_kernels`: the file stores Dense kernels (out, in), as torch Linear weights are.
  Raises ValueError starting with `source`, listing every missing, unexpected or mis-shaped weight.
  """
  shapes = jax.eval_shape(lambda: random_t5_encoder_params(config, 0))
  problems, leaves = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(p.key for p in path)
    name = name_of(keys)
    transpose = transpose_kernels and keys[-1] == "kernel"
    expected = leaf.shape[::-1] if transpose else leaf.shape
    value = tensors.pop(name, None)
    if value is None:
      problems.append(f"missing {name} {expected}")
    elif value.shape != expected:
      problems.append(f"{name} has shape {value.shape}, expected {expected}")
    leaves.append(None if value is None else (value.T if transpose else value))
  problems += [f"unexpected {k} {v.shape}" for k, v in sorted(tensors.items())]
  if problems:
    raise ValueError(f"{source} ({config}):\n  " + "\n  ".join(problems))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes),
                                      [jnp.asarray(v, jnp.float32) for v in leaves])


# --------------------------------------------------------------------------------------------------------------
# Official ELF encoder pickle import (the format of the published t5_small_encoder_jax.pkl).

# Every global such a pickle may name: numpy arrays, dtypes and scalars, under numpy 2's and numpy 1's module names.
# Dicts, lists, tuples, strings and Python numbers need no global at all.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, name): getattr(np._core.multiarray, name)  # pylint: disable=protected-access
       for module in ("numpy._core.multiarray", "numpy.core.multiarray") for name in ("_reconstruct", "scalar")},
}
_OFFICIAL_ATTENTION = "encoder/block_0/layer_0/SelfAttention"
_OFFICIAL_FF = "encoder/block_0/layer_1/DenseReluDense"


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Rebuilds dicts, lists, numpy arrays and scalars; any other global is refused before it is imported or run."""

  def find_class(self, module, name):
    allowed = _PICKLE_ALLOWED.get((module, name))
    if allowed is None:
      raise pickle.UnpicklingError(
          f"refused to load {module}.{name}: an encoder pickle may hold only dicts, lists, numpy arrays and "
          "scalars (the format of the official t5_small_encoder_jax.pkl), so nothing else in it is imported or "
          "run. If you trust the file, re-save its weights as such a dict of numpy arrays.")
    return allowed


def read_numpy_pickle(path: str) -> Any:
  """The object in a pickle file made only of dicts, lists, numpy arrays and scalars (local path or URL).

  Raises:
    pickle.UnpicklingError naming the file: it names any other global (never imported or executed), or it is
      not a pickle.
  """
  with epath.Path(path).open("rb") as f:
    try:
      return _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError) as e:
      raise pickle.UnpicklingError(f"{path}: {e}") from None


def _official_name(path: tuple[str, ...]) -> str:
  """Name in the official ELF encoder pickle of a Flax param path of ours (see the module docstring)."""
  top = path[0]
  if top == "shared":
    return "shared/embedding"
  if top == "relative_attention_bias":
    return f"{_OFFICIAL_ATTENTION}/relative_attention_bias/rel_embedding"
  if top == "final_layer_norm":
    return "encoder/final_layer_norm/weight"
  layer = {"attention_norm": "layer_0/layer_norm", "attention": "layer_0/SelfAttention",
           "ff_norm": "layer_1/layer_norm", "ff": "layer_1/DenseReluDense"}[path[1]]
  leaf = f"{path[2]}/kernel" if path[1] in ("attention", "ff") else "weight"
  return f"encoder/{top}/{layer}/{leaf}"


def _flatten_named(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """{'/'-joined key path: numpy array} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten_named(value, name + "/"))
    else:
      flat[name] = np.asarray(value)
  return flat


def load_official_t5_encoder(path: str) -> tuple[T5EncoderConfig, dict]:
  """Config and float32 `params` of an encoder pickled in the official ELF format (`t5_small_encoder_jax.pkl`).

  The file holds `{"params": nested dict of numpy arrays}` (a bare nested dict works too) in the official module's
  names, and no config: vocab_size and d_model come from `shared/embedding` (V, D), the bucket count and num_heads
  from the relative-attention table (buckets, H), d_kv from the q kernel (D, H*K), d_ff and the FFN kind from
  `wi` (ReLU) or `wi_0`/`wi_1` (gated-GELU), num_layers from the blocks; the max distance and layer-norm eps are
  the official module's fixed values (the `T5EncoderConfig` defaults). Read with a restricted unpickler.

  Raises:
    pickle.UnpicklingError: the pickle names anything but numpy arrays, dtypes and scalars (nothing is run).
    ValueError: the structure is not the official one; every missing, unexpected or mis-shaped weight is named.
  """
  tree = read_numpy_pickle(path)
  if isinstance(tree, Mapping) and "params" in tree:
    tree = tree["params"]
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path} holds a {type(tree).__name__}, not the official encoder checkpoint's "
                     "{'params': nested dict of numpy arrays}")
  tensors = _flatten_named(tree)

  def shape_of(name: str, ndim: int) -> tuple[int, ...]:
    if name not in tensors or tensors[name].ndim != ndim:
      found = f"has shape {tensors[name].shape}" if name in tensors else "is missing"
      raise ValueError(f"{path} is not an official ELF encoder pickle: {name} (a {ndim}-D array, needed to infer "
                       f"the T5 dims) {found}; its entries are {sorted(tensors)}")
    return tensors[name].shape

  vocab_size, d_model = shape_of("shared/embedding", 2)
  num_buckets, num_heads = shape_of(f"{_OFFICIAL_ATTENTION}/relative_attention_bias/rel_embedding", 2)
  inner = shape_of(f"{_OFFICIAL_ATTENTION}/q/kernel", 2)[1]
  gated = f"{_OFFICIAL_FF}/wi_0/kernel" in tensors
  d_ff = shape_of(f"{_OFFICIAL_FF}/{'wi_0' if gated else 'wi'}/kernel", 2)[1]
  if inner % num_heads:
    raise ValueError(f"{path}: the q kernel's width {inner} is not a multiple of the {num_heads} heads of the "
                     "relative-attention table")
  blocks = {int(m.group(1)) for name in tensors if (m := re.match(r"encoder/block_(\d+)/", name))}
  config = T5EncoderConfig(vocab_size=vocab_size, d_model=d_model, num_layers=max(blocks) + 1,
                           num_heads=num_heads, d_kv=inner // num_heads, d_ff=d_ff,
                           relative_attention_num_buckets=num_buckets,
                           feed_forward_proj="gated-gelu" if gated else "relu")
  return config, _params_from_named(config, tensors, _official_name, transpose_kernels=False,
                                    source=f"official encoder pickle {path!r} does not match the T5 layout "
                                           "inferred from its shapes")
