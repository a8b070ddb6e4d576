"""Optimisation (docs/method.md#training-recipe): learning rate, warm-up schedule, gradient clipping, Muon / AdamW, EMA.

`make_optimizer`, `clip_gradient` and `muon_dimension_numbers` are the entry points. Step counting and Muon's
parameter routing: docs/training.md#optimizer.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from elf_jax.config import LR_SCHEDULES, OPTIMIZERS, ConfigError, check_choice
from elf_jax.model import elf


def learning_rate(optim_config: ml_collections.ConfigDict, global_batch_size: int) -> float:
  """Peak learning rate `base_lr * global_batch_size / 256` (linear scaling rule).

  Args:
    optim_config: the `optim` group of the config (`base_lr`).
    global_batch_size: examples per optimizer update, summed over devices and accumulation micro-batches.
  """
  return optim_config.base_lr * global_batch_size / 256


def warmup_steps(optim_config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Warm-up length in optimizer updates: `warmup_steps` if >= 0, else `int(warmup_epochs * steps_per_epoch)`."""
  if optim_config.warmup_steps >= 0:
    return int(optim_config.warmup_steps)
  return int(optim_config.warmup_epochs * steps_per_epoch)


def make_schedule(optim_config: ml_collections.ConfigDict, steps_per_epoch: int,
                  total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer update: linear warm-up from 0 (value 0 at update 0), then constant or cosine to 0.

  Args:
    optim_config: the `optim` group (`base_lr`, `global_batch_size`, `warmup_steps`, `warmup_epochs`, `schedule`).
    steps_per_epoch: optimizer updates per epoch (used when `warmup_steps < 0`).
    total_steps: optimizer updates of the whole run; the cosine schedule reaches 0 there.

  Returns:
    An optax schedule: step (int) → learning rate (float32 scalar).
  """
  check_choice("optim.schedule", optim_config.schedule, LR_SCHEDULES)
  peak = learning_rate(optim_config, optim_config.global_batch_size)
  warmup = warmup_steps(optim_config, steps_per_epoch)
  if optim_config.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    if total_steps <= warmup:
      raise ConfigError(f"optim.schedule='cosine' needs more optimizer steps ({total_steps}) than warm-up steps "
                        f"({warmup}); lower --config.optim.warmup_steps / warmup_epochs or train longer "
                        "(optim.num_steps / num_epochs)")
    after = optax.cosine_decay_schedule(peak, decay_steps=total_steps - warmup)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup])


def muon_dimension_numbers(params):
  """Muon routing (module docstring): a kernel gets `MuonDimensionNumbers`, reduction = its `in` axis and output =
  its `out` axis (batched over the layer axis of a stacked (L, in, out) block kernel); None (→ Adam) for the rest."""
  def dimension_numbers(path, p):
    stacked = any(getattr(k, "key", None) == elf.BLOCKS for k in path)
    if p.ndim == 2 + stacked:
      return optax.contrib.MuonDimensionNumbers(reduction_axis=p.ndim - 2, output_axis=p.ndim - 1)
    return None
  return jax.tree_util.tree_map_with_path(dimension_numbers, params)


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   schedule: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """Muon or AdamW on the mean clipped gradient of a step (the clip is `clip_gradient`, in the train step).

  Muon: Nesterov momentum `muon_momentum` on 2-D leaves; its internal Adam (`muon_adam_b1`, `muon_adam_b2`, also
  Nesterov, as optax's `muon` builds it) on all other leaves (see the module docstring); the defaults are optax's.
  AdamW: (`adamw_b1`, `adamw_b2`). `weight_decay` (decoupled) applies to every leaf in either optimizer.

  Args:
    optim_config: the `optim` group (`optimizer`, `muon_*`, `adamw_*`, `weight_decay`).
    schedule: learning rate, a float or a schedule over optimizer updates (`make_schedule`).
  """
  check_choice("optim.optimizer", optim_config.optimizer, OPTIMIZERS)
  if optim_config.optimizer == "muon":
    return optax.contrib.muon(
        schedule, beta=optim_config.muon_momentum, weight_decay=optim_config.weight_decay,
        adam_b1=optim_config.muon_adam_b1, adam_b2=optim_config.muon_adam_b2,
        adam_weight_decay=optim_config.weight_decay, muon_weight_dimension_numbers=muon_dimension_numbers)
  return optax.adamw(schedule, b1=optim_config.adamw_b1, b2=optim_config.adamw_b2,
                     weight_decay=optim_config.weight_decay)


def clip_gradient(grads, optim_config: ml_collections.ConfigDict):
  """`grads` scaled to global norm `optim.grad_clip` where larger (`optax.clip_by_global_norm`); 0 = no clip.

  The train step applies it to each micro-batch's gradient before averaging them, as the reference's
  chain(clip, MultiSteps(...)) does.
  """
  if optim_config.grad_clip < 0:
    raise ValueError(f"config.optim.grad_clip must be >= 0 (0 disables clipping), got {optim_config.grad_clip}.")
  if optim_config.grad_clip == 0:
    return grads
  clipped, _ = optax.clip_by_global_norm(optim_config.grad_clip).update(grads, optax.EmptyState())
  return clipped


def ema_update(ema_params, params, decay: float):
  """`ema ← decay·ema + (1 − decay)·params`, once per optimizer update; float32 result.

  Args:
    ema_params: the EMA tree (same structure as `params`).
    params: the parameters after the update (any float dtype).
    decay: EMA decay per optimizer update, e.g. 0.9999.
  """
  return jax.tree.map(lambda ema, p: decay * ema.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32),
                      ema_params, params)
