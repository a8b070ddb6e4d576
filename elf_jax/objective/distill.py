"""Progressive distillation (docs/method.md#distillation; the authors' PyTorch branch `distillation`): one round.

`draw_noise` and `compute_loss` give the student's loss against the frozen teacher. Decoder and denoising rows,
the teacher's sub-steps and the cost: docs/training.md#distillation-objective.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from elf_jax.model.elf import ELF
from elf_jax.model.latents import LatentEncoder
from elf_jax.objective import flow
from elf_jax.objective import loss as L
from elf_jax.objective import step as step_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
  """Static settings of one distillation round, built by `from_config` (the schedules' defaults live only in
  `config.distill` of `elf_jax.config.base_config()`).

  student_steps: the student's sampling steps (span Δ = 1 / student_steps); teacher_sub_steps: K, the teacher's
  Euler sub-steps per student step; student_schedule / teacher_schedule: `logit_normal` | `uniform` draws of the
  student's u and of the teacher's inner sub-step times (P_mean / P_std of the flow config); span_fallback: spans
  below it take the teacher's last x̂ instead of the (ill-conditioned) inversion.
  """
  student_steps: int
  teacher_sub_steps: int
  student_schedule: str
  teacher_schedule: str
  span_fallback: float = 1e-3

  @property
  def span(self) -> float:
    return 1.0 / self.student_steps

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, student_steps: int, teacher_sub_steps: int,
                  **overrides) -> "DistillConfig":
    """One round (`student_steps`, `teacher_sub_steps`, an entry of `distill.rounds`) of `config.distill`."""
    return cls(**{**dict(student_steps=student_steps, teacher_sub_steps=teacher_sub_steps,
                         student_schedule=config.distill.student_schedule,
                         teacher_schedule=config.distill.teacher_schedule), **overrides})


def sub_step_times(rng, t_s, t_t, num_sub_steps: int, schedule: str, p_mean: float, p_std: float) -> jax.Array:
  """The teacher's grid per example: (B, K + 1) = t_s, K − 1 sorted schedule draws mapped into [t_s, t_t], t_t."""
  u = flow.sample_time(rng, t_s.shape + (num_sub_steps - 1,), schedule, p_mean, p_std)
  inner = t_s[:, None] + (t_t - t_s)[:, None] * jnp.sort(u, axis=-1)
  return jnp.concatenate([t_s[:, None], inner, t_t[:, None]], axis=-1)


def draw_noise(rng, batch_size: int, seq_len: int, latent_dim: int, fc: flow.FlowConfig,
               dc: DistillConfig) -> dict[str, jax.Array]:
  """Every random quantity of one distillation step, for the whole global batch.

  Returns decoder (B,) bool (the CE rows); t_s, t_t (B,) (1 on decoder rows); sub_step_times (B, K + 1); w (B,)
  guidance scales; use_self_cond (B,) bool (never on decoder rows); eps (B,S,C) unit Gaussian denoiser noise;
  decoder_lambda (B,S); decoder_noise (B,S,C) already × decoder_noise_scale; dropout (key).
  """
  names = ("decoder", "u", "sub_steps", "w", "self_cond", "eps", "lambda", "decoder_noise", "dropout")
  k = dict(zip(names, jax.random.split(rng, len(names))))
  b, s, c = batch_size, seq_len, latent_dim
  decoder = jax.random.bernoulli(k["decoder"], fc.decoder_prob, (b,))
  u = flow.sample_time(k["u"], (b,), dc.student_schedule, fc.P_mean, fc.P_std)
  t_s = jnp.where(decoder, 1.0, u * max(1.0 - dc.span, 1e-6))
  t_t = jnp.where(decoder, 1.0, t_s + dc.span)
  return dict(
      decoder=decoder, t_s=t_s, t_t=t_t,
      sub_step_times=sub_step_times(k["sub_steps"], t_s, t_t, dc.teacher_sub_steps, dc.teacher_schedule, fc.P_mean,
                                    fc.P_std),
      w=flow.sample_guidance_scale(k["w"], (b,), fc.guidance_min, fc.guidance_max),
      use_self_cond=jax.random.bernoulli(k["self_cond"], fc.self_cond_prob, (b,)) & ~decoder,
      eps=jax.random.normal(k["eps"], (b, s, c)),
      **L.draw_decoder_corruption(k["lambda"], k["decoder_noise"], (b, s, c), fc),
      dropout=k["dropout"],
  )


def teacher_target(model: ELF, teacher_params, x0, cond_mask, z_s, t_s, t_t, w, sc_half, times, t_eps: float,
                   span_fallback: float) -> jax.Array:
  """The PD target x̃ (B,S,C) at t_s: K = times.shape[1] − 1 teacher Euler sub-steps on `times` (B, K + 1), inverted.

  The first sub-step self-conditions on `sc_half` (B,S,C), later ones on the previous sub-step's x̂; condition
  positions (cond_mask (B,S)) stay at x0 in z and x_sc. K = 1 gives the teacher's x̂ itself.
  """
  keep = cond_mask.astype(bool)[..., None]

  def sub_step(carry, ts):
    z, x_prev = carry
    t, t_next = ts
    x_hat = L.apply_network(model, teacher_params, z, jnp.where(keep, x0, x_prev), t, w)
    z = jnp.where(keep, x0, z + (t_next - t)[:, None, None] * flow.velocity(x_hat, z, t, t_eps))
    return (z, x_hat), None

  (z_t, x_last), _ = jax.lax.scan(sub_step, (z_s, sc_half), (times[:, :-1].T, times[:, 1:].T))
  if times.shape[1] == 2:  # one sub-step inverts to its own x̂ (exactly so also where 1 − t_s < t_eps)
    return x_last
  span = (t_t - t_s)[:, None, None]
  inverted = z_s + (1.0 - t_s)[:, None, None] / jnp.maximum(span, 1e-6) * (z_t - z_s)
  return jnp.where(span < span_fallback, x_last, inverted)


def per_example_loss(model: ELF, params, teacher_params, batch, noise, fc: flow.FlowConfig, dc: DistillConfig,
                     dropout_rng=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Each row's loss (B,): token CE for decoder rows, the PD MSE for the others; and the teacher's tensors.

  batch: x0 (B,S,C) normalised latents, ids (B,S) int32, cond_mask / loss_mask (B,S) bool. noise: `draw_noise`.
  Returns (loss (B,), {"teacher_x_init", "sc_half", "target"} (B,S,C) each).
  """
  x0, keep, loss_mask = batch["x0"], batch["cond_mask"].astype(bool)[..., None], batch["loss_mask"]
  decoder, t_s, w = noise["decoder"], noise["t_s"], noise["w"]
  clean_cond = jnp.where(keep, x0, 0.0)
  z_s = jnp.where(keep, x0, flow.interpolate(x0, noise["eps"], t_s, fc.denoiser_noise_scale))
  x_init = L.apply_network(model, teacher_params, z_s, clean_cond, t_s, w)
  sc_half = jnp.where(keep, x0, jnp.where(noise["use_self_cond"][:, None, None], x_init, 0.0))
  target = teacher_target(model, teacher_params, x0, batch["cond_mask"], z_s, t_s, noise["t_t"], w, sc_half,
                          noise["sub_step_times"], fc.t_eps, dc.span_fallback)
  x_init, sc_half, target = jax.lax.stop_gradient((x_init, sc_half, target))

  z = jnp.where(decoder[:, None, None], L.decoder_input(x0, noise), z_s)
  x_hat, logits = L.apply_network(model, params, z, sc_half, t_s, w, decode=decoder.astype(jnp.float32),
                                  dropout_rng=dropout_rng)
  row_mean = jax.vmap(flow.masked_mean)
  loss = jnp.where(decoder, row_mean(L.token_nll(logits, batch["ids"]), loss_mask),
                   row_mean(L.per_token_sq_error(x_hat, target), loss_mask))
  return loss, dict(teacher_x_init=x_init, sc_half=sc_half, target=target)


def distill_loss(model: ELF, params, teacher_params, batch, noise, fc: flow.FlowConfig, dc: DistillConfig,
                 dropout_rng=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch loss (mean over rows of `per_example_loss`) and metrics: denoise_loss (PD rows), decode_loss (CE
  rows; NaN where a batch has none of them), decode_fraction."""
  rows, _ = per_example_loss(model, params, teacher_params, batch, noise, fc, dc, dropout_rng)
  return L.summarize(L.branch_sums(rows, noise["decoder"]), rows.shape[0])


@dataclasses.dataclass(frozen=True)
class DistillObjective:
  """Everything static the distillation step needs: the network (student = teacher architecture), the frozen
  encoder, the flow and the round's settings."""
  model: ELF
  encoder: LatentEncoder
  flow: flow.FlowConfig
  distill: DistillConfig
  conditional: bool = False


def compute_loss(params, frozen: step_lib.FrozenInputs, batch, rng, obj: DistillObjective,
                 mesh=None) -> tuple[jax.Array, dict[str, Any]]:
  """ids-level distillation loss for `step.train_step` (the frozen inputs carry the teacher's params).

  One program for the global batch (every row runs the same passes, no branch): the batch stays sharded over the
  mesh's batch axes and the teacher's parameters like the student's.
  """
  del mesh  # sharding follows the inputs
  b, s = batch["ids"].shape
  noise = draw_noise(rng, b, s, obj.encoder.dim, obj.flow, obj.distill)
  data = step_lib.with_latents(obj.encoder, frozen.encoder_params, batch, obj.conditional)
  return distill_loss(obj.model, params, frozen.teacher_params, data, noise, obj.flow, obj.distill,
                      noise["dropout"])
