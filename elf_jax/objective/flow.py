"""Pure flow math (docs/method.md#objective, #sampling): time sampling, the path, x̂ → v, guided target, time grids.

Conventions: t = 0 is noise, t = 1 is data; latents are (B, S, C); per-example scalars are (B,).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from elf_jax.config import SAMPLE_GRIDS, SELF_COND_DRAWS, TIME_SCHEDULES, check_choice


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowConfig:
  """Static objective hyper-parameters (docs/method.md#objective), built by `from_config`: the fields of `config.flow`
  of the same names (their meaning and defaults live only in `elf_jax.config.base_config()`)."""
  denoiser_noise_scale: float
  time_schedule: str
  P_mean: float
  P_std: float
  t_eps: float
  self_cond_prob: float
  guidance_min: float
  guidance_max: float
  decoder_prob: float
  decoder_noise_scale: float
  decoder_m_mean: float
  decoder_m_std: float
  label_drop_prob: float
  self_cond_draw: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> "FlowConfig":
    """From `config.flow`; `overrides` replace fields (the defaults with a change:
    `FlowConfig.from_config(base_config(), decoder_prob=0.5)`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in config.flow.items() if k in names}, **overrides})


def _bcast(s: jax.Array, like: jax.Array) -> jax.Array:
  """(B,) → (B, 1, ..., 1) to broadcast against `like`."""
  return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def sample_time(rng, shape, schedule: str, p_mean: float, p_std: float) -> jax.Array:
  """Training times: `logit_normal` t = sigmoid(N(p_mean, p_std)) or `uniform` U(0, 1)."""
  check_choice("time schedule (flow.time_schedule, distill.*_schedule)", schedule, TIME_SCHEDULES)
  if schedule == "logit_normal":
    return jax.nn.sigmoid(p_mean + p_std * jax.random.normal(rng, shape))
  return jax.random.uniform(rng, shape)


def sample_guidance_scale(rng, shape, w_min: float, w_max: float) -> jax.Array:
  """Log-uniform guidance scale: w = a (b / a)^u − 1 with a = 1 + w_min, b = 1 + w_max, u ~ U(0, 1)."""
  a, b = 1.0 + w_min, 1.0 + w_max
  return a * (b / a) ** jax.random.uniform(rng, shape) - 1.0


def num_self_conditioned(group_size: int, prob: float) -> int:
  """Self-conditioned examples per group of `group_size` under the `fixed_count` draw: round(prob · group_size)."""
  return int(round(prob * group_size))


def sample_self_cond(rng, batch_size: int, num_groups: int, prob: float, draw: str) -> jax.Array:
  """(B,) bool: which examples are self-conditioned.

  `bernoulli` (the reference): an independent coin with probability `prob` per example (`num_groups` unused).
  `fixed_count` (opt-in): in each of `num_groups` contiguous groups, a uniformly random subset of exactly
  `num_self_conditioned(B / num_groups, prob)` examples, so that the x_sc = 0 pass can run on a static-shape subset.
  """
  check_choice("flow.self_cond_draw", draw, SELF_COND_DRAWS)
  if draw == "bernoulli":
    return jax.random.bernoulli(rng, prob, (batch_size,))
  n = batch_size // num_groups
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (num_groups, n)), axis=-1), axis=-1)
  return (rank < num_self_conditioned(n, prob)).reshape(batch_size)


def interpolate(x0, eps, t, sigma: float):
  """The path z_t = t·x0 + (1 − t)·σ·ε; x0, eps (B, S, C), t (B,) or (B, S)."""
  t = _bcast(t, x0)
  return t * x0 + (1.0 - t) * sigma * eps


def velocity(x_hat, z, t, t_eps: float):
  """v = (x̂ − z) / max(1 − t, t_eps); used for the prediction v̂ and (with x0) the target v."""
  return (x_hat - z) / jnp.maximum(1.0 - _bcast(t, z), t_eps)


def guided_target(v, v_cond, v_uncond, w):
  """Self-conditioning guidance target: v + (1 − 1/w)(v_cond − v_uncond), w (B,)."""
  return v + (1.0 - 1.0 / _bcast(w, v)) * (v_cond - v_uncond)


def masked_mean(values, mask):
  """Mean of `values` (B, S) over positions where mask (B, S) is true; 0 if none."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def logit_normal_grid(logits):
  """(..., steps − 1) logits → (..., steps + 1) grid: 0, the sorted sigmoid(logits), 1."""
  inner = jnp.sort(jax.nn.sigmoid(jnp.asarray(logits, jnp.float32)), axis=-1)
  one = jnp.ones(inner.shape[:-1] + (1,), inner.dtype)
  return jnp.concatenate([jnp.zeros_like(one), inner, one], axis=-1)


def time_grid(steps: int, kind: str, rng=None, p_mean: float | None = None, p_std: float | None = None,
              batch: int | None = None):
  """Sampling grid of `steps` intervals: (steps + 1,) points from 0 to 1 (or (batch, steps + 1) if `batch`).

  `uniform`: linspace. `logit_normal`: `logit_normal_grid` of steps − 1 draws p_mean + p_std · N(0, 1) from `rng`
  (one grid per batch element when `batch` is given).
  """
  check_choice("sample.grid", kind, SAMPLE_GRIDS)
  if kind == "uniform":
    grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
    return grid if batch is None else jnp.broadcast_to(grid, (batch, steps + 1))
  if rng is None or p_mean is None or p_std is None:
    raise ValueError("a logit_normal time grid is random: pass an rng and its p_mean / p_std "
                     "(config.sample.grid_p_mean / grid_p_std)")
  shape = (steps - 1,) if batch is None else (batch, steps - 1)
  return logit_normal_grid(p_mean + p_std * jax.random.normal(rng, shape))
