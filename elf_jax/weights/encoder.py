"""Frozen-encoder weights: the T5 encoder of a Hugging Face checkpoint, the official ELF encoder pickle, or fixed
seeded random weights, and `build_encoder`, which turns `config.encoder` into a `LatentEncoder` and its params.

Parameter names on each side are listed in `elf_jax/model/t5_encoder.py`'s docstring.
"""
from collections.abc import Callable, Mapping
import os
import pickle
import re
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elf_jax import hub, recipes
from elf_jax.config import ConfigError
from elf_jax.model.latents import LatentEncoder
from elf_jax.model.t5_encoder import T5Encoder, T5EncoderConfig, random_t5_encoder_params
from elf_jax.weights import hf


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
  directory = hub.resolve_dir(name_or_path, "T5", ["config.json"], field="encoder.name_or_path")
  config = T5EncoderConfig.from_hf_config(hf.read_config(directory))
  tensors = hf.read_state_dict(directory, keep=lambda key: key.startswith(("shared.", "encoder.")))
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

def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
  """`_codecs.encode` as pickle protocols 0-2 use it for the bytes of an array (latin-1 text -> bytes), only that."""
  if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
    raise pickle.UnpicklingError(f"refused _codecs.encode of a {type(text).__name__} with {encoding!r}")
  return text.encode("latin1")


def _plain_bytes(*args) -> bytes:
  """`bytes(...)` as protocols 0-2 write an empty buffer; never a size (which would allocate it)."""
  if args and not isinstance(args[0], (bytes, bytearray, list)):
    raise pickle.UnpicklingError(f"refused bytes({type(args[0]).__name__})")
  return bytes(*args)


# Every global a pickle of numpy arrays, dtypes and scalars names under pickle protocols 0-5, under numpy 2's and
# numpy 1's module names (protocols 0-2 also spell bytes as `_codecs.encode(latin-1 text)`, protocol 5 rebuilds
# arrays with `_frombuffer`). Dicts, lists, tuples, strings and Python numbers need no global at all.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _plain_bytes,
    ("__builtin__", "bytes"): _plain_bytes,
    **{(module, name): getattr(np._core.multiarray, name)  # pylint: disable=protected-access
       for module in ("numpy._core.multiarray", "numpy.core.multiarray") for name in ("_reconstruct", "scalar")},
    **{(module, "_frombuffer"): np._core.numeric._frombuffer  # pylint: disable=protected-access
       for module in ("numpy._core.numeric", "numpy.core.numeric")},
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


# The authors' encoder (T5-small's encoder in the official module's names), by hub path, as their recipes name it.
OFFICIAL_ENCODER = recipes.OFFICIAL_ENCODER
_T5_SMALL = T5EncoderConfig(vocab_size=32128, d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=2048)
# Frozen encoders whose architecture is known without their files (the published T5-small), for `abstract=True`.
KNOWN_ENCODERS = {"t5-small": _T5_SMALL, OFFICIAL_ENCODER: _T5_SMALL}


def build_encoder(config: ml_collections.ConfigDict, abstract: bool = False) -> tuple[LatentEncoder, dict]:
  """The frozen encoder of `config.encoder`: Hugging Face weights (local dir / hub id), an official ELF encoder
  pickle (a `.pkl` path or hub path such as `OFFICIAL_ENCODER`) or "random" seeded weights.

  abstract: return the parameters' ShapeDtypeStructs without loading any weights (ahead-of-time compilation); the
  architecture then comes from the "random" fields, `KNOWN_ENCODERS`, a local Hugging Face directory's config.json
  or the `.pkl` file's shapes.
  Returns (encoder, params). Raises ConfigError if the encoder width differs from `config.encoder.dim`.
  """
  e = config.encoder
  if e.name_or_path == "random":
    t5_config = T5EncoderConfig(vocab_size=config.model.vocab_size, d_model=e.dim, num_layers=e.random_num_layers,
                                num_heads=e.random_num_heads, d_kv=e.random_d_kv, d_ff=e.random_d_ff)
    load = lambda: random_t5_encoder_params(t5_config, e.random_seed)
  elif abstract and e.name_or_path in KNOWN_ENCODERS:
    t5_config, load = KNOWN_ENCODERS[e.name_or_path], None
  elif e.name_or_path.endswith(".pkl"):
    t5_config, params = load_official_t5_encoder(
        str(hub.resolve(e.name_or_path, "encoder.name_or_path", "encoder pickle")))
    load = lambda: params
  elif abstract and os.path.isfile(os.path.join(e.name_or_path, "config.json")):
    t5_config, load = T5EncoderConfig.from_hf_config(hf.read_config(e.name_or_path)), None
  elif abstract:
    raise ConfigError(f"encoder.name_or_path={e.name_or_path!r}: its architecture is unknown offline; use one of "
                      f"{sorted(KNOWN_ENCODERS)}, 'random', an official .pkl or a local directory with a T5 "
                      "config.json")
  else:
    t5_config, params = load_hf_t5_encoder(e.name_or_path)
    load = lambda: params
  if t5_config.d_model != e.dim:
    raise ConfigError(f"encoder {e.name_or_path!r} has width {t5_config.d_model} but config.encoder.dim={e.dim}; "
                      f"set --config.encoder.dim={t5_config.d_model}")
  t5 = T5Encoder(t5_config, dtype=jnp.dtype(e.compute_dtype))
  if abstract:
    params = jax.eval_shape(load or (lambda: random_t5_encoder_params(t5_config, 0)))
  else:
    params = load()
  return LatentEncoder(t5, latent_mean=e.latent_mean, latent_std=e.latent_std), params
