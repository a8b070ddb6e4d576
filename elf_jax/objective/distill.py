"""Progressive distillation (docs/method.md#distillation; the authors' PyTorch branch `distillation`): one round.

A student of the teacher's architecture learns to cover a span Δ = 1 / student_steps of the flow in one
evaluation. Per example, a decoder coin picks the branch:

    decoder row:   token CE at t = 1 on [λ·x0 + (1 − λ)·σ_dec·ε_dec, clean condition | 0]   (mode tokens on)
    denoising row: t_s = u·(1 − Δ) (u from the student schedule), t_t = t_s + Δ, z_s = t_s·x0 + (1 − t_s)·σ·ε
                   x_sc = teacher x̂(z_s, t_s, x_sc = 0) on a self-conditioning coin, else 0 (condition clean)
                   the frozen teacher integrates K Euler sub-steps t_s → t_t (its own sub-step grid, x_sc chained
                   from sub-step to sub-step, condition pinned) and the PD inversion
                   x̃ = z_s + (1 − t_s) / (t_t − t_s) · (z_{t_t} − z_s)   (the last sub-step's x̂ where Δ ≈ 0)
                   is the target of the student's x̂(z_s, t_s, x_sc): masked MSE, mean over C.

Both kinds of rows share one student forward (the mode tokens gated per example, `ELF(decode=gate)`); the loss is
the mean over rows of each row's masked mean over its loss tokens. The teacher costs K + 1 forward passes per row.
Everything random is drawn by `draw_noise` for the global batch, so the loss depends only on the seed.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from elf_jax.model.elf import ELF
from elf_jax.model.latents import LatentEncoder
from elf_jax.objective import flow
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
      decoder_lambda=jax.nn.sigmoid(fc.decoder_m_mean + fc.decoder_m_std * jax.random.normal(k["lambda"], (b, s))),
      decoder_noise=fc.decoder_noise_scale * jax.random.normal(k["decoder_noise"], (b, s, c)),
      dropout=k["dropout"],
  )


def _x_hat(model: ELF, params, z, x_sc, t, w):
  """The network's x̂ (B,S,C) on concat[z, x_sc] (no key-padding mask, as the reference)."""
  return model.apply({"params": params}, jnp.concatenate([z, x_sc], -1), t, w)


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
    x_hat = _x_hat(model, teacher_params, z, jnp.where(keep, x0, x_prev), t, w)
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
  x_init = _x_hat(model, teacher_params, z_s, clean_cond, t_s, w)
  sc_half = jnp.where(keep, x0, jnp.where(noise["use_self_cond"][:, None, None], x_init, 0.0))
  target = teacher_target(model, teacher_params, x0, batch["cond_mask"], z_s, t_s, noise["t_t"], w, sc_half,
                          noise["sub_step_times"], fc.t_eps, dc.span_fallback)
  x_init, sc_half, target = jax.lax.stop_gradient((x_init, sc_half, target))

  lam = noise["decoder_lambda"][..., None]
  z = jnp.where(decoder[:, None, None], lam * x0 + (1.0 - lam) * noise["decoder_noise"], z_s)
  dropout = dropout_rng is not None and model.config.dropout_rate > 0
  x_hat, logits = model.apply({"params": params}, jnp.concatenate([z, sc_half], -1), t_s, w,
                              decode=decoder.astype(jnp.float32), deterministic=not dropout,
                              rngs={"dropout": dropout_rng} if dropout else None)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), batch["ids"][..., None], -1)[..., 0]
  sq_error = jnp.mean(jnp.square(x_hat - target), axis=-1)
  row_mean = jax.vmap(flow.masked_mean)
  loss = jnp.where(decoder, row_mean(nll, loss_mask), row_mean(sq_error, loss_mask))
  return loss, dict(teacher_x_init=x_init, sc_half=sc_half, target=target)


def distill_loss(model: ELF, params, teacher_params, batch, noise, fc: flow.FlowConfig, dc: DistillConfig,
                 dropout_rng=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch loss (mean over rows of `per_example_loss`) and metrics: denoise_loss (PD rows), decode_loss (CE
  rows; NaN where a batch has none of them), decode_fraction."""
  rows, _ = per_example_loss(model, params, teacher_params, batch, noise, fc, dc, dropout_rng)
  is_dec = noise["decoder"].astype(jnp.float32)
  n_dec = jnp.sum(is_dec)
  n_den = rows.shape[0] - n_dec
  loss = jnp.mean(rows)
  return loss, dict(loss=loss,
                    denoise_loss=jnp.where(n_den > 0, jnp.sum(rows * (1 - is_dec)) / jnp.maximum(n_den, 1), jnp.nan),
                    decode_loss=jnp.where(n_dec > 0, jnp.sum(rows * is_dec) / jnp.maximum(n_dec, 1), jnp.nan),
                    decode_fraction=n_dec / rows.shape[0])


@dataclasses.dataclass(frozen=True)
class DistillObjective:
  """Everything static the distillation step needs: the network (student = teacher architecture), the frozen
  encoder, the flow and the round's settings."""
  model: ELF
  encoder: LatentEncoder
  flow: flow.FlowConfig
  distill: DistillConfig
  conditional: bool = False


def compute_loss(params, frozen, batch, rng, obj: DistillObjective, mesh=None) -> tuple[jax.Array, dict[str, Any]]:
  """ids-level distillation loss for `step.train_step`: frozen = (encoder params, teacher params).

  One program for the global batch (every row runs the same passes, no branch): the batch stays sharded over the
  mesh's batch axes and the teacher's parameters like the student's.
  """
  del mesh  # sharding follows the inputs
  encoder_params, teacher_params = frozen
  b, s = batch["ids"].shape
  noise = draw_noise(rng, b, s, obj.encoder.dim, obj.flow, obj.distill)
  x0 = step_lib.batch_latents(obj.encoder, encoder_params, batch, obj.conditional)
  data = dict({k: v for k, v in batch.items() if k != "latents"}, x0=x0)
  return distill_loss(obj.model, params, teacher_params, data, noise, obj.flow, obj.distill, noise["dropout"])
