"""The latent space (docs/method.md#latents): ids → frozen T5 encoder → normalised latents x0 = (E(ids) − mean) / std.

`LatentEncoder` is static (hashable: the T5 module and the normalisation constants); its weights travel separately
as a pytree so jit sees them as arguments, not constants.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elf_jax import hf_weights
from elf_jax import report
from elf_jax.config import ConfigError
from elf_jax.model.t5_encoder import (T5Encoder, T5EncoderConfig, load_hf_t5_encoder, load_official_t5_encoder,
                                      make_encoder_mask, random_t5_encoder_params)


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
  """Frozen encoder + latent normalisation. `dim` is C."""
  t5: T5Encoder
  latent_mean: float = 0.0
  latent_std: float = 0.2

  @property
  def dim(self) -> int:
    return self.t5.config.d_model

  @property
  def vocab_size(self) -> int:
    return self.t5.config.vocab_size

  def encode(self, params, ids, valid, cond_mask=None, drop_condition=None):
    """ids (B,S) int32, valid / cond_mask (B,S) bool, drop_condition (B,) bool → x0 (B,S,C) float32.

    Builds the full (B,S,S) encoder mask (condition rows see only the condition; dropped examples' targets do not
    see it) and zeroes the condition latents of dropped examples.
    """
    conditional = cond_mask is not None
    mask = make_encoder_mask(valid, cond_mask if conditional else None, drop_condition if conditional else None)
    x0 = (self.t5.apply({"params": params}, ids, mask) - self.latent_mean) / self.latent_std
    if conditional and drop_condition is not None:
      x0 = jnp.where((drop_condition[:, None] & cond_mask)[..., None], 0.0, x0)
    return jax.lax.stop_gradient(x0)

  def encode_raw(self, params, ids, valid):
    """ids (B,S) int32, valid (B,S) bool → raw encoder outputs E(ids) (B,S,C) float32, not normalised (what a
    latent cache stores and what the statistics are measured on)."""
    return dataclasses.replace(self, latent_mean=0.0, latent_std=1.0).encode(params, ids, valid)

  def with_stats(self, mean: float, std: float) -> "LatentEncoder":
    return dataclasses.replace(self, latent_mean=float(mean), latent_std=float(std))


# Frozen encoders whose architecture is known without their files (the published T5-small), for `abstract=True`.
KNOWN_ENCODERS = {
    "t5-small": T5EncoderConfig(vocab_size=32128, d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=2048),
}


def build_encoder(config: ml_collections.ConfigDict, abstract: bool = False) -> tuple[LatentEncoder, dict]:
  """The frozen encoder of `config.encoder`: Hugging Face weights (local dir / hub id), an official ELF encoder
  pickle (a `.pkl` file such as `t5_small_encoder_jax.pkl`) or "random" seeded weights.

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
  elif e.name_or_path.endswith(".pkl"):
    t5_config, params = load_official_t5_encoder(e.name_or_path)
    load = lambda: params
  elif abstract and e.name_or_path in KNOWN_ENCODERS:
    t5_config, load = KNOWN_ENCODERS[e.name_or_path], None
  elif abstract and os.path.isfile(os.path.join(e.name_or_path, "config.json")):
    t5_config, load = T5EncoderConfig.from_hf_config(hf_weights.read_config(e.name_or_path)), None
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
  return LatentEncoder(t5, e.latent_mean, e.latent_std), params


def measure_latent_stats(encoder: LatentEncoder, params, batches, max_batches: int = 8) -> tuple[float, float]:
  """Mean and std of the raw encoder outputs E(ids) over valid tokens of up to `max_batches` batches.

  Each batch is a dict with `ids`, `valid` (and optionally `cond_mask`). Used when `encoder.measure_latent_stats`
  is set (e.g. the random encoder of the offline default, whose output scale is not T5-small's).
  """
  encode = jax.jit(encoder.encode_raw)
  total, total_sq, count = 0.0, 0.0, 0
  for i, batch in enumerate(batches):
    if i >= max_batches:
      break
    x = np.asarray(encode(params, batch["ids"], batch["valid"]), np.float64)
    m = np.asarray(batch["valid"], bool)
    total += x[m].sum()
    total_sq += np.square(x[m]).sum()
    count += int(m.sum()) * x.shape[-1]
  if count == 0:
    raise ValueError("measure_latent_stats: the batches hold no valid tokens")
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))
  report.say(f"measured latent stats: mean {mean:.4f} std {std:.4f} over {count} values")
  return float(mean), std
