"""The ELF training objective (docs/method.md#objective), the reference train step's: denoiser branch with trained
self-conditioning guidance, decoder branch.

`draw_noise` draws all randomness for the global batch; `grouped_loss` evaluates each group's branch. Groups, cost,
self-conditioning coins and the reference's conventions: docs/training.md#loss.
"""
from typing import Any

import jax
import jax.numpy as jnp

from elf_jax.model.elf import ELF
from elf_jax.objective import flow


def draw_noise(rng, batch_size: int, seq_len: int, latent_dim: int, fc: flow.FlowConfig, num_groups: int,
               conditional: bool = False) -> dict[str, jax.Array]:
  """Every random quantity of one training step, for the whole global batch (the reference's draws, one to one).

  Returns eps (B,S,C) unit Gaussian denoiser noise (the path scales it by `denoiser_noise_scale`); t (B,) times;
  w (B,) guidance scales; self_cond (B,) bool (`flow.sample_self_cond` with `fc.self_cond_draw`); decoder_lambda
  (B,S) per-token decoder signal level; decoder_noise (B,S,C) decoder noise, already × `decoder_noise_scale`;
  drop_condition (B,) bool (label dropping, conditional tasks only); group_decode (G,) bool, the decoder coin per
  group; dropout (key) for dropout masks.
  """
  names = ("eps", "t", "w", "self_cond", "lambda", "decoder_noise", "drop", "coin", "dropout")
  k = dict(zip(names, jax.random.split(rng, len(names))))
  b, s, c = batch_size, seq_len, latent_dim
  drop = jax.random.bernoulli(k["drop"], fc.label_drop_prob, (b,)) if conditional else jnp.zeros((b,), bool)
  return dict(
      eps=jax.random.normal(k["eps"], (b, s, c)),
      t=flow.sample_time(k["t"], (b,), fc.time_schedule, fc.P_mean, fc.P_std),
      w=flow.sample_guidance_scale(k["w"], (b,), fc.guidance_min, fc.guidance_max),
      self_cond=flow.sample_self_cond(k["self_cond"], b, num_groups, fc.self_cond_prob, fc.self_cond_draw),
      **draw_decoder_corruption(k["lambda"], k["decoder_noise"], (b, s, c), fc),
      drop_condition=drop,
      group_decode=jax.random.bernoulli(k["coin"], fc.decoder_prob, (num_groups,)),
      dropout=k["dropout"],
  )


def draw_decoder_corruption(lambda_rng, noise_rng, shape: tuple[int, int, int],
                            fc: flow.FlowConfig) -> dict[str, jax.Array]:
  """The decoder branch's draws (docs/method.md#decoder-branch) for a (B, S, C) batch: decoder_lambda (B,S) =
  sigmoid(N(m_mean, m_std)), the per-token signal level, and decoder_noise (B,S,C), unit Gaussian ×
  `decoder_noise_scale`."""
  b, s, _ = shape
  return dict(
      decoder_lambda=jax.nn.sigmoid(fc.decoder_m_mean + fc.decoder_m_std * jax.random.normal(lambda_rng, (b, s))),
      decoder_noise=fc.decoder_noise_scale * jax.random.normal(noise_rng, shape))


def decoder_input(x0, noise) -> jax.Array:
  """The decoder branch's z (B,S,C) = λ·x0 + (1 − λ)·noise at every position (the condition's too)."""
  lam = noise["decoder_lambda"][..., None]
  return lam * x0 + (1.0 - lam) * noise["decoder_noise"]


def per_token_sq_error(pred, target) -> jax.Array:
  """(B,S): the squared error averaged over the latent channels."""
  return jnp.mean(jnp.square(pred - target), axis=-1)


def token_nll(logits, ids) -> jax.Array:
  """(B,S) float32: −log softmax(logits)[ids], the decoder's per-token cross-entropy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]


def apply_network(model: ELF, params, z, x_sc, t, w, decode=False, dropout_rng=None):
  """The network on concat[z, x_sc] without a key-padding mask (as the reference trains); dropout iff a key is
  given and the model has dropout. decode: False (x̂), True (logits) or a (B,) gate ((x̂, logits))."""
  dropout = dropout_rng is not None and model.config.dropout_rate > 0
  return model.apply({"params": params}, jnp.concatenate([z, x_sc], -1), t, w, None, decode=decode,
                     deterministic=not dropout, rngs={"dropout": dropout_rng} if dropout else None)


def self_cond_pass_rows(group_size: int, fc: flow.FlowConfig) -> int:
  """How many rows of a denoising group the no-gradient x_sc = 0 pass runs on (static): all of them
  (`bernoulli`), the self-conditioned ones (`fixed_count`), none when `self_cond_prob` is 0."""
  if fc.self_cond_draw == "fixed_count":
    return flow.num_self_conditioned(group_size, fc.self_cond_prob)
  return group_size if fc.self_cond_prob > 0 else 0


def denoiser_loss(model: ELF, params, batch, noise, fc: flow.FlowConfig, dropout_rng):
  """Flow-matching loss of one group (docs/method.md#self-conditioning). batch: x0 (b,S,C), cond_mask, loss_mask (b,S).

  With `fc.self_cond_draw == "fixed_count"`, noise["self_cond"] (b,) must mark exactly
  `flow.num_self_conditioned(b, fc.self_cond_prob)` examples.
  """
  x0, cond = batch["x0"], batch["cond_mask"][..., None]
  t, w, self_cond = noise["t"], noise["w"], noise["self_cond"]
  clean_cond = lambda x: jnp.where(cond, x0, x)  # the clean condition latent at condition positions
  z = clean_cond(flow.interpolate(x0, noise["eps"], t, fc.denoiser_noise_scale))
  v = flow.velocity(x0, z, t, fc.t_eps)

  # x̂ of the no-gradient x_sc = 0 pass (zero on rows it skips): the first self-conditioning pass and v_uncond.
  b = z.shape[0]
  num_rows = self_cond_pass_rows(b, fc)
  x_uncond = jnp.zeros_like(z)
  if num_rows == b:
    x_uncond = jax.lax.stop_gradient(apply_network(model, params, z, clean_cond(jnp.zeros_like(z)), t, w))
  elif num_rows:  # fixed_count: only the self-conditioned rows
    rows = jnp.argsort(~self_cond, stable=True)[:num_rows]
    x_sc_rows = jnp.where(cond[rows], x0[rows], 0.0)
    x_rows = apply_network(model, params, z[rows], x_sc_rows, t[rows], w[rows])
    x_uncond = x_uncond.at[rows].set(jax.lax.stop_gradient(x_rows))
  use_sc = self_cond[:, None, None]
  x_sc = clean_cond(jnp.where(use_sc, x_uncond, 0.0))
  x_hat = apply_network(model, params, z, x_sc, t, w, dropout_rng=dropout_rng)
  # For self-conditioned rows [z, x_sc] is the v_cond pass input; without dropout that pass is the main one.
  x_cond = x_hat if model.config.dropout_rate == 0 else apply_network(model, params, z, x_sc, t, w)
  x_cond = jax.lax.stop_gradient(x_cond)

  v_uncond = flow.velocity(x_uncond, z, t, fc.t_eps)
  v_cond = flow.velocity(x_cond, z, t, fc.t_eps)
  target = jnp.where(use_sc, flow.guided_target(v, v_cond, v_uncond, w), v)
  v_hat = flow.velocity(x_hat, z, t, fc.t_eps)
  return flow.masked_mean(per_token_sq_error(v_hat, target), batch["loss_mask"])


def decoder_loss(model: ELF, params, batch, noise, fc: flow.FlowConfig, dropout_rng):
  """Token cross-entropy of one group decoded at t = 1 from a partially noised x0 (docs/method.md#decoder-branch).

  Every position is noised, the condition's too, and the self-conditioning half is all zeros (as the reference).
  """
  del fc  # the decoder noise is drawn already scaled
  z = decoder_input(batch["x0"], noise)
  logits = apply_network(model, params, z, jnp.zeros_like(z), jnp.ones_like(noise["t"]), noise["w"], decode=True,
                         dropout_rng=dropout_rng)
  return flow.masked_mean(token_nll(logits, batch["ids"]), batch["loss_mask"])


def grouped_loss(model: ELF, params, batch, noise, fc: flow.FlowConfig, group_offset=0, skip_other_branch: bool = True):
  """Sum over the groups of this batch of each group's loss, with per-branch sums.

  batch/noise hold `g = len(noise['group_decode'])` groups of equal size along axis 0 (g ≥ 1); `group_offset`
  is the global index of the first group (for dropout keys). `skip_other_branch=False` evaluates both branches and
  selects one: needed when the branches hold collectives (tensor parallelism), since devices taking different
  `lax.cond` branches would then wait on each other forever. Returns (loss_sum, denoise_sum, decode_sum, num_decode).
  """
  g = noise["group_decode"].shape[0]
  per_example = {k: v for k, v in noise.items() if k not in ("group_decode", "dropout")}
  split = lambda x: x.reshape((g, x.shape[0] // g) + x.shape[1:])
  groups = jax.tree_util.tree_map(split, (batch, per_example))

  def one_group(args):
    (gb, gn), is_decode, index = args
    rng = jax.random.fold_in(noise["dropout"], group_offset + index)
    branches = (lambda: denoiser_loss(model, params, gb, gn, fc, rng),
                lambda: decoder_loss(model, params, gb, gn, fc, rng))
    if skip_other_branch:
      return jax.lax.cond(is_decode, branches[1], branches[0])
    return jnp.where(is_decode, branches[1](), branches[0]())

  if g == 1:
    losses = one_group((jax.tree_util.tree_map(lambda x: x[0], groups), noise["group_decode"][0], 0))[None]
  else:
    losses = jax.lax.map(one_group, (groups, noise["group_decode"], jnp.arange(g)))
  return branch_sums(losses, noise["group_decode"])


def summarize(sums, num_groups) -> tuple[jax.Array, dict[str, Any]]:
  """(loss_sum, denoise_sum, decode_sum, num_decode) over `num_groups` groups (or rows) → (loss, metrics): loss,
  denoise_loss / decode_loss (mean over the groups of that branch; NaN where there are none), decode_fraction."""
  loss_sum, den_sum, dec_sum, n_dec = sums
  n_den = num_groups - n_dec
  metrics = dict(loss=loss_sum / num_groups,
                 denoise_loss=jnp.where(n_den > 0, den_sum / jnp.maximum(n_den, 1), jnp.nan),
                 decode_loss=jnp.where(n_dec > 0, dec_sum / jnp.maximum(n_dec, 1), jnp.nan),
                 decode_fraction=n_dec / num_groups)
  return loss_sum / num_groups, metrics


def branch_sums(losses, is_decode) -> tuple[jax.Array, ...]:
  """Per-group (or per-row) losses (G,) and decoder flags (G,) → `summarize`'s (loss, denoise, decode, count) sums."""
  is_decode = is_decode.astype(jnp.float32)
  return (jnp.sum(losses), jnp.sum(losses * (1 - is_decode)), jnp.sum(losses * is_decode), jnp.sum(is_decode))
