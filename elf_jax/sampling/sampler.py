"""Pure-functional ODE/SDE sampler (docs/method.md#sampling): trained self-conditioning guidance, classifier-free
guidance, conditional prefixes and token decoding.

`sample` / `make_sampler` are the entry points. The sampling loop, known (condition / prefix) positions and
randomness: docs/sampling.md#sampler.
"""
from collections.abc import Callable
import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from elf_jax.config import SAMPLE_METHODS, check_choice, sample_settings
from elf_jax.objective import flow
from elf_jax.parallel.mesh import batch_axes, traced_under_mesh


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
  """Static sampler settings (hashable: `make_sampler` compiles once per config), built by `from_config`; the
  defaults live only in `elf_jax.config.base_config()` (e.g. `SampleConfig.from_config(base_config(), eos_id=1,
  pad_id=0, steps=8)`).

  method: one of SAMPLE_METHODS; steps: grid intervals (= denoiser evaluations); grid: one of SAMPLE_GRIDS;
  grid_p_mean / grid_p_std: the logit-normal grid's sigmoid(N(P_mean, P_std)) draws; gamma: SDE churn γ;
  guidance_scale: default self-conditioning guidance w; cfg_scale: classifier-free guidance s (1 = off;
  conditional only); noise_scale: σ of the initial and churn noise; t_eps: velocity denominator floor;
  eos_id / pad_id: the tokenizer's token ids (no config field: given to from_config); max_target_length: conditional
  outputs keep at most this many target tokens (0 = all; from a config: max_length − max_condition_length, as the
  official generation cuts them); return_trajectory: keep x̂ of every step.
  """
  method: str
  steps: int
  grid: str
  grid_p_mean: float
  grid_p_std: float
  gamma: float
  guidance_scale: float
  cfg_scale: float
  noise_scale: float
  t_eps: float
  eos_id: int
  pad_id: int
  max_target_length: int
  return_trajectory: bool

  def __post_init__(self):
    check_choice("sample.method", self.method, SAMPLE_METHODS)
    if self.steps < 1:
      raise ValueError(f"sample.steps={self.steps}: need at least one step")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> "SampleConfig":
    """From a full run config: the sampling settings of `config.sample` (`elf_jax.config.sample_settings`: what
    `overrides` or the config set, `sample.preset` for the rest), σ and t_eps of `config.flow`, and the target length
    of a conditional `config.data`."""
    f, d = config.flow, config.data
    fields = dict(**sample_settings(config, **overrides), noise_scale=f.denoiser_noise_scale, t_eps=f.t_eps,
                  return_trajectory=config.sample.save_trajectory,
                  max_target_length=d.max_length - d.max_condition_length if d.conditional else 0)
    return cls(**{**fields, **overrides})


class SampleOutput(NamedTuple):
  """latents (B, S, C) final z; ids (B, S) int32 target tokens after EOS masking (conditional: condition stripped,
  targets left-aligned, padded with pad_id); raw_ids (B, S) int32 argmax over the full sequence before any masking;
  trajectory (steps, B, S, C) x̂ of every step or None; trajectory_t (steps, B) the time each x̂ was evaluated at
  (t_b for SDE) or None."""
  latents: jax.Array
  ids: jax.Array
  raw_ids: jax.Array
  trajectory: jax.Array | None
  trajectory_t: jax.Array | None


def evaluations_per_sample(steps: int, cfg: bool) -> int:
  """Network evaluations per sample: one per step (two with CFG, run as one batched call) plus one decode."""
  return steps * (2 if cfg else 1) + 1


def draw_initial_noise(rng: jax.Array, batch: int, seq_len: int, latent_dim: int, noise_scale: float) -> jax.Array:
  """z0 = σ·ε, ε ~ N(0, I), shape (batch, seq_len, latent_dim) float32, drawn for the global batch."""
  return noise_scale * jax.random.normal(rng, (batch, seq_len, latent_dim), jnp.float32)


def draw_inputs(rng: jax.Array, config: SampleConfig, batch: int, seq_len: int, latent_dim: int):
  """All randomness of one sampling run from one key: (z0 (B, S, C), grid (steps + 1,), sde_rng).

  The grid is one per batch (random for `logit_normal`, docs/method.md#sampling); everything has global shapes.
  """
  k_noise, k_grid, k_sde = jax.random.split(rng, 3)
  z0 = draw_initial_noise(k_noise, batch, seq_len, latent_dim, config.noise_scale)
  grid = flow.time_grid(config.steps, config.grid, k_grid, config.grid_p_mean, config.grid_p_std)
  return z0, grid, k_sde


_draw_inputs_jit = jax.jit(draw_inputs, static_argnums=(1, 2, 3, 4))


def strip_condition(ids: jax.Array, cond_mask: jax.Array, pad_id: int) -> jax.Array:
  """Target tokens left-aligned per example: non-condition positions of ids (B, S) in order, then pad_id."""
  order = jnp.argsort(cond_mask.astype(jnp.int32), axis=-1, stable=True)  # targets first, in order
  is_target = jnp.take_along_axis(~cond_mask.astype(bool), order, axis=-1)
  return jnp.where(is_target, jnp.take_along_axis(ids, order, axis=-1), pad_id)


def mask_after_eos(ids: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
  """ids (B, S) with everything from the first EOS on (the EOS included) replaced by pad_id."""
  return jnp.where(jnp.cumsum(ids == eos_id, axis=-1) > 0, pad_id, ids)


def finalize_ids(raw_ids, cond_mask=None, mask=None, *, eos_id: int, pad_id: int,
                 max_target_length: int = 0) -> jax.Array:
  """raw argmax ids (B, S) → target ids (B, S): padded positions → pad_id, condition stripped, positions from
  max_target_length on → pad_id (if > 0), EOS masking."""
  ids = raw_ids if mask is None else jnp.where(mask.astype(bool), raw_ids, pad_id)
  if cond_mask is not None:
    ids = strip_condition(ids, cond_mask, pad_id)
  if max_target_length > 0:
    ids = jnp.where(jnp.arange(ids.shape[-1]) < max_target_length, ids, pad_id)
  return mask_after_eos(ids, eos_id, pad_id)


def _per_example(x, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(x, jnp.float32), (batch,))


@flax.struct.dataclass
class PinnedLatents:
  """Positions held at given clean latents for the whole run (they get zero velocity): latents (B, S, C) float32
  (only pinned positions are read) and mask (B, S) bool, true at pinned positions."""
  latents: jax.Array
  mask: jax.Array


@flax.struct.dataclass
class SampleInputs:
  """The per-run inputs of `sample` (a pytree of arrays: traced, not compiled in; `sample_from_seed` draws them).

  z0: (B, S, C) initial latents, already σ·ε (`draw_initial_noise`).
  grid: (steps + 1,) shared or (B, steps + 1) per-example times, 0 → 1 non-decreasing.
  guidance_scale: self-conditioning guidance w, scalar or (B,), also used for decoding; None = the config's.
  rng: key of the SDE churn noise: step i draws σ·N(0, I) from fold_in(rng, i).
  churn_noise: (steps − 1, B, S, C) the churn noise of every step but the last (already × σ), used instead of rng.
  condition: the known positions, a conditional task's condition or a prefix to continue (clean in both halves of
    the input, zeroed in CFG's unconditional half, stripped from the output ids), or None.
  mask: (B, S) padding mask for the network (1 = valid), or None (all valid, as the reference samples).
  """
  z0: jax.Array
  grid: jax.Array
  guidance_scale: jax.Array | None = None
  rng: jax.Array | None = None
  churn_noise: jax.Array | None = None
  condition: PinnedLatents | None = None
  mask: jax.Array | None = None


def _guided_x_hat(params, model, z, x_prev, t, w, mask, condition: PinnedLatents | None, keep, cfg_scale: float):
  """One (CFG-combined) denoiser evaluation → x̂ (B, S, C), clean condition latents at condition positions."""
  apply = lambda x, tt, ww, m: model.apply({"params": params}, x, tt, ww, m)
  if condition is None:
    return apply(jnp.concatenate([z, x_prev], -1), t, w, mask)
  cond_latents = condition.latents
  z_c, x_c = jnp.where(keep, cond_latents, z), jnp.where(keep, cond_latents, x_prev)
  x_in = jnp.concatenate([z_c, x_c], -1)
  if cfg_scale == 1.0:
    x_hat = apply(x_in, t, w, mask)
  else:  # conditional and unconditional halves in one batched call
    x_unc = jnp.where(keep, 0.0, jnp.concatenate([z, x_prev], -1))
    two = lambda a: None if a is None else jnp.concatenate([a, a], 0)
    both = apply(jnp.concatenate([x_in, x_unc], 0), two(t), two(w), two(mask))
    x_cond, x_uncond = jnp.split(both, 2, axis=0)
    x_hat = x_uncond + cfg_scale * (x_cond - x_uncond)
  return jnp.where(keep, cond_latents, x_hat)


def sample(params, model: nn.Module, inputs: SampleInputs, config: SampleConfig) -> SampleOutput:
  """Samples token sequences with the ELF flow (docs/method.md#sampling); pure and jit-compatible (`config` static).

  params: the network's parameter tree (EMA params for sampling); model: the `ELF` module (static); inputs: the
  run's arrays (`SampleInputs`); config: the settings (method, γ, CFG scale, σ, t_eps, EOS / pad ids, target
  length, trajectory). Returns a SampleOutput (see its docstring).
  """
  condition, mask = inputs.condition, inputs.mask
  if config.cfg_scale != 1.0 and condition is None:
    raise ValueError(f"cfg_scale={config.cfg_scale} needs a condition (inputs.condition); use cfg_scale=1.0")
  if config.method == "sde" and inputs.rng is None and inputs.churn_noise is None:
    raise ValueError("method='sde' draws churn noise: pass inputs.rng (or the noise itself, inputs.churn_noise)")
  z0 = inputs.z0
  batch = z0.shape[0]
  w = _per_example(config.guidance_scale if inputs.guidance_scale is None else inputs.guidance_scale, batch)
  grid = jnp.broadcast_to(jnp.asarray(inputs.grid, jnp.float32), (batch, jnp.shape(inputs.grid)[-1]))
  steps = grid.shape[1] - 1
  churn_noise = inputs.churn_noise
  if churn_noise is not None:
    if config.method != "sde" or churn_noise.shape != (steps - 1,) + z0.shape:
      raise ValueError(f"churn_noise {churn_noise.shape} with method={config.method!r}: it is the SDE noise of every "
                       f"step but the last, shape (steps − 1,) + z0.shape = {(steps - 1,) + z0.shape}")
    last = jnp.zeros((1,) + z0.shape, jnp.float32)  # the last step is an ODE step
    churn_noise = jnp.concatenate([jnp.asarray(churn_noise, jnp.float32), last])
  keep = None if condition is None else condition.mask.astype(bool)[..., None]
  hold = (lambda a, clean: a) if keep is None else (lambda a, clean: jnp.where(keep, clean, a))
  cond_latents = None if condition is None else condition.latents
  z = hold(z0.astype(jnp.float32), cond_latents)

  def step(carry, xs):
    z, x_prev = carry
    i, t, t_next, noise = xs  # t, t_next: (B,); noise: this step's churn noise (B, S, C) or None
    if config.method == "sde":
      alpha = jnp.where(i == steps - 1, 1.0, jnp.clip(1.0 - config.gamma * (t_next - t), 0.0, 1.0))
      if noise is None:
        noise = config.noise_scale * jax.random.normal(jax.random.fold_in(inputs.rng, i), z.shape, z.dtype)
      a = alpha[:, None, None]
      z = hold(a * z + (1.0 - a) * noise, cond_latents)
      t = alpha * t
    x_hat = _guided_x_hat(params, model, z, x_prev, t, w, mask, condition, keep, config.cfg_scale)
    v = hold(flow.velocity(x_hat, z, t, config.t_eps), 0.0)
    z = z + (t_next - t)[:, None, None] * v
    return (z, x_hat), ((x_hat, t) if config.return_trajectory else None)

  xs = (jnp.arange(steps), grid[:, :-1].T, grid[:, 1:].T, churn_noise)
  (z, _), traj = jax.lax.scan(step, (z, jnp.zeros_like(z)), xs)
  logits = model.apply({"params": params}, jnp.concatenate([z, jnp.zeros_like(z)], -1), jnp.ones((batch,)), w, mask,
                       decode=True)
  raw_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  ids = finalize_ids(raw_ids, None if condition is None else condition.mask, mask, eos_id=config.eos_id,
                     pad_id=config.pad_id, max_target_length=config.max_target_length)
  x_traj, t_traj = traj if config.return_trajectory else (None, None)
  return SampleOutput(z, ids, raw_ids, x_traj, t_traj)


def make_sampler(model: nn.Module, config: SampleConfig,
                 mesh: jax.sharding.Mesh | None = None) -> Callable[[Any, SampleInputs], SampleOutput]:
  """A jit-compiled `run(params, inputs: SampleInputs) -> SampleOutput` with the static settings of `config`.

  Compiled once per input structure and shapes; inputs may be sharded (see `shard_batch`), the output follows.
  With `mesh` the sampler is traced under it, so per-shard kernels (the Pallas attention) split the batch, the
  CFG-doubled one included, over its axes instead of being called on the whole array.
  """
  run = lambda params, inputs: sample(params, model, inputs, config)
  return jax.jit(run if mesh is None else traced_under_mesh(run, mesh))


def shard_batch(mesh: jax.sharding.Mesh, tree, axis: str | tuple[str, ...] | None = None):
  """Places every array of `tree` with its leading (batch) dimension split over the mesh axes `axis` (default the
  batch axes, data × fsdp; None leaves stay None). Each process passes the same global values (a mesh may span
  processes); the batch must divide by the axes' size."""
  axis = batch_axes(mesh) if axis is None else axis
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))

  def put(x):
    if x.shape[0] % size:
      raise ValueError(f"batch {x.shape[0]} does not divide over mesh axis {axis!r} of size {size}; "
                       f"use a batch that is a multiple of {size}")
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map(put, tree)


def sample_from_seed(sampler: Callable[[Any, SampleInputs], SampleOutput], params, rng: jax.Array,
                     config: SampleConfig, *, batch: int, seq_len: int, latent_dim: int,
                     mesh: jax.sharding.Mesh | None = None, axis: str | tuple[str, ...] | None = None,
                     guidance_scale=None, condition: PinnedLatents | None = None,
                     mask: jax.Array | None = None) -> SampleOutput:
  """Draws z0, the grid and the SDE key for the global batch from `rng`, shards the batch over the mesh axes `axis`
  (if a mesh is given; default data × fsdp; params are replicated) and runs `sampler` (from `make_sampler(model,
  config)`). Every process of a multi-process mesh makes the same call; the output arrays span the mesh.

  Samples depend only on `rng`, not on the device count. condition / mask: as in `SampleInputs`.
  """
  z0, grid, sde_rng = _draw_inputs_jit(rng, config, batch, seq_len, latent_dim)
  w = config.guidance_scale if guidance_scale is None else guidance_scale
  per_row = dict(z0=z0, guidance_scale=_per_example(w, batch), condition=condition, mask=mask)
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, grid, sde_rng = jax.device_put((params, grid, sde_rng), replicated)
    per_row = shard_batch(mesh, per_row, axis)
  return sampler(params, SampleInputs(grid=grid, rng=sde_rng, **per_row))
