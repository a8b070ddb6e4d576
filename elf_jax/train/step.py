"""The pure, sharded train step: (state, encoder params, batch) → (state, metrics).

Data flow per step: draw all noise for the global batch → frozen encoder on the sharded batch (label dropping
decides its mask) → per-batch-shard program (`jax.shard_map` over the batch axes) that evaluates each of its coin
groups with `lax.cond`, so decoding groups skip the self-conditioning pass → gradients (psum over the batch axes by
shard_map's transpose) → optimizer (Muon / AdamW, accumulation-aware) → EMA on optimizer steps only.

The result depends only on the seed and `num_groups`, not on the mesh: one device runs the same groups
sequentially (`lax.map`).
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax.config import ConfigError
from elf_jax.model.elf import ELF, init_params
from elf_jax.model.latents import LatentEncoder
from elf_jax.parallel.mesh import batch_axes, num_batch_shards
from elf_jax.train import loss as L
from elf_jax.train import optim
from elf_jax.train.state import TrainState

BATCH_KEYS = ("ids", "valid", "cond_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything static the loss needs: the network, the frozen encoder, the flow hyper-parameters, grouping."""
  model: ELF
  encoder: LatentEncoder
  flow: L.FlowConfig
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


def batch_latents(encoder: LatentEncoder, encoder_params, batch, conditional: bool, drop_condition=None):
  """Normalised latents x0 (B,S,C) of a batch: the frozen encoder on its ids, or its cached `latents` (then only
  the normalisation is applied). drop_condition (B,) bool: label dropping (conditional tasks)."""
  if "latents" in batch:
    if conditional:
      raise ValueError("cached latents are for unconditional data (label dropping changes the encoder mask); "
                       "unset data.latent_cache_dir for conditional tasks")
    return (batch["latents"].astype(jnp.float32) - encoder.latent_mean) / encoder.latent_std
  return encoder.encode(encoder_params, batch["ids"], batch["valid"], batch["cond_mask"] if conditional else None,
                        drop_condition)


def compute_loss(params, encoder_params, batch, rng, obj: Objective, mesh: jax.sharding.Mesh | None = None):
  """ids-level ELF loss: (params, encoder params, batch, rng) → (loss, metrics).

  batch: ids (B,S) int32, valid / cond_mask / loss_mask (B,S) bool, and optionally `latents` (B,S,C) float32, the
  raw encoder outputs from a latent cache (unconditional data; `elf_jax.data.latent_cache`): then the encoder is
  not run and only the normalisation (latents − mean) / std is applied. With a mesh of several batch shards each
  shard evaluates its own groups (shard_map over the batch axes; other axes stay automatic).
  """
  b, s = batch["ids"].shape
  noise = L.draw_noise(rng, b, s, obj.encoder.dim, obj.flow, obj.num_groups, obj.conditional)
  x0 = batch_latents(obj.encoder, encoder_params, batch, obj.conditional, noise["drop_condition"])
  data = dict({k: v for k, v in batch.items() if k != "latents"}, x0=x0)
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


def train_step(state: TrainState, frozen, batch, *, obj: Objective, optimizer: optax.GradientTransformation,
               optim_config: ml_collections.ConfigDict, mesh=None, loss_fn=compute_loss):
  """One micro-step: gradients of one batch, an optimizer call, EMA and step advance when an update was applied.

  loss_fn(params, frozen, batch, rng, obj, mesh) → (loss, metrics): `compute_loss` (frozen = the encoder's
  params) or another objective of the same shape (e.g. `distill.compute_loss`, frozen = (encoder, teacher)).
  """
  rng, step_rng = jax.random.split(state.rng)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, step_rng, obj, mesh)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  applied = optim.is_update_step(opt_state, optim_config)
  ema = optim.ema_update(state.ema_params, params, optim_config.ema_decay, applied)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  new_state = TrainState(step=state.step + applied.astype(state.step.dtype), params=params, ema_params=ema,
                         opt_state=opt_state, rng=rng)
  return new_state, metrics


def make_train_step(obj: Objective, optimizer, optim_config, mesh=None, state_shardings: Any = None,
                    loss_fn=compute_loss, frozen_shardings: Any = None):
  """`jax.jit`-compiled train step with declared in/out shardings and donated state (when a mesh is given).

  frozen_shardings: of the step's frozen inputs (default: replicated, right for the encoder's params)."""
  fn = functools.partial(train_step, obj=obj, optimizer=optimizer, optim_config=optim_config, mesh=mesh,
                         loss_fn=loss_fn)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  batch_sh = NamedSharding(mesh, P(batch_axes(mesh)))  # every batch array (ids, masks, cached latents)
  replicated = NamedSharding(mesh, P())
  frozen_shardings = replicated if frozen_shardings is None else frozen_shardings

  def traced_under_mesh(*args):  # per-shard kernels (the Pallas attention) read the mesh while tracing
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return jax.jit(traced_under_mesh, in_shardings=(state_shardings, frozen_shardings, batch_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def init_state(model: ELF, optimizer, rng, seq_len: int) -> TrainState:
  """A fresh TrainState (params from `rng`, EMA = params); use under jit with out_shardings to create it sharded."""
  params_rng, state_rng = jax.random.split(rng)
  params = nn.unbox(init_params(model, params_rng, seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params), rng=state_rng)
