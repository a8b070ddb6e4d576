"""The pure, sharded train step: (state, encoder params, batch) → (state, metrics), made by `make_train_step`.

Data flow per step and why the result does not depend on the mesh: docs/training.md#train-step.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from elf_jax.config import ConfigError
from elf_jax.model.elf import ELF, init_params
from elf_jax.model.latents import LatentEncoder
from elf_jax.objective import flow, optim
from elf_jax.objective import loss as L
from elf_jax.objective.state import TrainState
from elf_jax.parallel import sharding
from elf_jax.parallel.mesh import batch_axes, num_batch_shards, traced_under_mesh

BATCH_KEYS = ("ids", "valid", "cond_mask", "loss_mask")
FINITE_METRICS = ("loss", "grad_norm")  # metrics every step must keep finite (else: stop, or skip the update)


@dataclasses.dataclass(frozen=True)
class ElfObjective:
  """Everything static the ELF loss needs: the network, the frozen encoder, the flow hyper-parameters, grouping."""
  model: ELF
  encoder: LatentEncoder
  flow: flow.FlowConfig
  num_groups: int
  conditional: bool = False


def resolve_num_groups(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None, batch_size: int) -> int:
  """`flow.decoder_groups`, or one group per batch shard when -1; checked against the batch and the mesh."""
  shards = 1 if mesh is None else num_batch_shards(mesh)
  groups = shards if config.flow.decoder_groups == -1 else int(config.flow.decoder_groups)
  if groups < 1 or batch_size % groups:
    raise ConfigError(f"flow.decoder_groups={groups} must be >= 1 and divide the per-step batch {batch_size}")
  if groups % shards:
    raise ConfigError(f"flow.decoder_groups={groups} must be a multiple of the {shards} batch shards of the mesh "
                     f"(data x fsdp); set --config.flow.decoder_groups=-1 for one group per shard")
  return groups


@flax.struct.dataclass
class FrozenInputs:
  """The step's inputs that receive no gradient: the encoder's params and, for distillation, the teacher's."""
  encoder_params: Any
  teacher_params: Any = None


def with_latents(encoder: LatentEncoder, encoder_params, batch, conditional: bool, drop_condition=None):
  """The batch with normalised latents x0 (B,S,C) in place of `latents`: the frozen encoder on its ids, or its
  cached `latents` (then only the normalisation is applied). drop_condition (B,) bool: label dropping."""
  if "latents" in batch:
    if conditional:
      raise ValueError("cached latents are for unconditional data (label dropping changes the encoder mask); "
                       "unset data.latent_cache_dir for conditional tasks")
    x0 = (batch["latents"].astype(jnp.float32) - encoder.latent_mean) / encoder.latent_std
  else:
    x0 = encoder.encode(encoder_params, batch["ids"], batch["valid"], batch["cond_mask"] if conditional else None,
                        drop_condition)
  return dict({k: v for k, v in batch.items() if k != "latents"}, x0=x0)


def compute_loss(params, frozen: FrozenInputs, batch, rng, obj: ElfObjective, mesh: jax.sharding.Mesh | None = None):
  """ids-level ELF loss: (params, frozen encoder params, batch, rng) → (loss, metrics).

  batch: ids (B,S) int32, valid / cond_mask / loss_mask (B,S) bool, and optionally `latents` (B,S,C) float32, the
  raw encoder outputs from a latent cache (unconditional data; `elf_jax.data.latent_cache`): then the encoder is
  not run and only the normalisation (latents − mean) / std is applied. With a mesh of several batch shards each
  shard evaluates its own groups (shard_map over the batch axes; other axes stay automatic).
  """
  b, s = batch["ids"].shape
  noise = L.draw_noise(rng, b, s, obj.encoder.dim, obj.flow, obj.num_groups, obj.conditional)
  data = with_latents(obj.encoder, frozen.encoder_params, batch, obj.conditional, noise["drop_condition"])
  shards = 1 if mesh is None else num_batch_shards(mesh)
  if shards == 1:  # every device evaluates the same group at the same time
    return L.summarize(L.grouped_loss(obj.model, params, data, noise, obj.flow), obj.num_groups)
  # Tensor-parallel collectives inside lax.cond branches that differ between batch shards would deadlock:
  # evaluate both branches and select instead.
  skip = mesh.shape.get("tensor", 1) == 1

  axes = batch_axes(mesh)
  per_shard = obj.num_groups // shards

  def local(params, data, noise):
    offset = jax.lax.axis_index(axes) * per_shard
    sums = L.grouped_loss(obj.model, params, data, noise, obj.flow, group_offset=offset, skip_other_branch=skip)
    return jax.tree_util.tree_map(lambda x: jax.lax.psum(x, axes), sums)

  noise_specs = {k: (P() if k == "dropout" else P(axes)) for k in noise}
  sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), noise_specs), out_specs=P(),
                       axis_names=frozenset(axes), check_vma=False)(params, data, noise)
  return L.summarize(sums, obj.num_groups)


def split_micro_batches(batch, num_micro: int, mesh=None):
  """(B, ...) arrays → (num_micro, B / num_micro, ...): micro-batch j holds rows j, j + num_micro, j + 2·num_micro, …

  Rows are interleaved so that each batch shard's contiguous block of rows splits locally: every micro-batch stays
  sharded over the batch axes like the whole batch (no data moves between devices).
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes(mesh))))
  return jax.tree.map(split, batch)


def train_step(state: TrainState, frozen: FrozenInputs, batch, *, obj, optimizer: optax.GradientTransformation,
               optim_config: ml_collections.ConfigDict, mesh=None, loss_fn=compute_loss):
  """One optimizer step on the whole per-update batch (B = optim.global_batch_size rows), as the reference's
  chain(clip_by_global_norm, MultiSteps(optimizer, k)) fed k micro-batches.

  The batch is split into k = optim.grad_accum_steps micro-batches (`split_micro_batches`); `lax.scan` computes each
  micro-batch's gradient with its own rng (`fold_in(step rng, j)`), clips it (global norm `optim.grad_clip`) and sums
  it; the mean clipped gradient then drives one optimizer update and one EMA update, and the step advances by one.

  loss_fn(params, frozen, batch, rng, obj, mesh) → (loss, metrics): `compute_loss` or another objective of the
  same shape (e.g. `distill.compute_loss`, whose frozen inputs carry the teacher).

  A step whose loss or gradient norm is not finite (any micro-batch's) is applied as usual, and the loop stops the
  run when it sees it; with `optim.skip_nonfinite` it leaves params, EMA and optimizer state unchanged instead (the
  step count and rng still advance) and reports `skipped_nonfinite` = 1.

  Returns:
    (new state, metrics): every metric of loss_fn averaged over the micro-batches that define it (NaN-valued ones,
    e.g. decode_loss of a micro-batch without a decoding group, are left out; `loss` and `grad_norm` are plain means,
    so one non-finite micro-batch shows), and grad_norm, the mean over micro-batches of each micro-batch gradient's
    global norm before clipping.
  """
  num_micro = optim_config.grad_accum_steps
  rng, step_rng = jax.random.split(state.rng)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(grad_sum, micro):
    index, micro_batch = micro
    (_, metrics), grads = grad_fn(state.params, frozen, micro_batch, jax.random.fold_in(step_rng, index), obj, mesh)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    grad_sum = jax.tree.map(jnp.add, grad_sum, optim.clip_gradient(grads, optim_config))
    return grad_sum, metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  micro_batches = (jnp.arange(num_micro), split_micro_batches(batch, num_micro, mesh))
  grad_sum, metrics = jax.lax.scan(micro_step, zeros, micro_batches)
  grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, params, optim_config.ema_decay)
  metrics = {k: (jnp.mean if k in FINITE_METRICS else jnp.nanmean)(v) for k, v in metrics.items()}
  if optim_config.skip_nonfinite:
    finite = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in FINITE_METRICS]))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, ema, opt_state = keep((params, ema, opt_state), (state.params, state.ema_params, state.opt_state))
    metrics["skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, rng=rng)
  return new_state, metrics


def make_train_step(obj, optimizer, optim_config, mesh=None, state_shardings: Any = None, loss_fn=compute_loss,
                    with_teacher: bool = False):
  """`jax.jit`-compiled train step with declared in/out shardings and donated state (when a mesh is given).

  Frozen inputs: the encoder's params replicated; with_teacher: teacher params sharded like the student's."""
  fn = functools.partial(train_step, obj=obj, optimizer=optimizer, optim_config=optim_config, mesh=mesh,
                         loss_fn=loss_fn)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  frozen_shardings = FrozenInputs(replicated, state_shardings.params if with_teacher else None)
  return jax.jit(traced_under_mesh(fn, mesh), in_shardings=(state_shardings, frozen_shardings,
                                                             sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def init_boxed_state(model: ELF, optimizer, rng, seq_len: int) -> TrainState:
  """A fresh TrainState (params from `rng`, EMA = params) whose parameter leaves stay `nn.LogicallyPartitioned`, and
  so do the optimizer moments `optimizer.init` builds from them: under `jax.eval_shape`, the input of
  `state.state_shardings`."""
  params_rng, state_rng = jax.random.split(rng)
  params = init_params(model, params_rng, seq_len)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params), rng=state_rng)


def init_state(model: ELF, optimizer, rng, seq_len: int) -> TrainState:
  """`init_boxed_state` unboxed; use under jit with out_shardings (`state.state_shardings`) to create it sharded."""
  return nn.unbox(init_boxed_state(model, optimizer, rng, seq_len))
