"""The latent space (docs/method.md#latents): ids → frozen T5 encoder → normalised latents x0 = (E(ids) − mean) / std.

`LatentEncoder` is static (hashable: the T5 module and the normalisation constants); its weights travel separately
as a pytree so jit sees them as arguments, not constants.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from elf_jax import report
from elf_jax.model.t5_encoder import T5Encoder, make_encoder_mask


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
  """Frozen encoder + latent normalisation. `dim` is C."""
  t5: T5Encoder
  latent_mean: float  # x0 = (E(ids) − latent_mean) / latent_std (config.encoder)
  latent_std: float

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
