"""TrainState: everything a training run carries from step to step (and into every checkpoint)."""
from typing import Any

import flax.struct
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  """Params, EMA params, optimizer state, step and RNG.

  Attributes:
    step: int32 scalar, number of optimizer updates applied (one per train step, whatever its micro-batch count).
    params: the flow transformer's parameter tree (float32).
    ema_params: exponential moving average of `params`, updated once per optimizer update.
    opt_state: optax state of Muon or AdamW.
    rng: PRNG key (raw uint32[2]); each step splits off its own key, and micro-batch j uses fold_in(that key, j).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def state_shardings(mesh: jax.sharding.Mesh, state_shapes: TrainState, specs_of_params) -> TrainState:
  """NamedShardings for a whole TrainState: params and EMA per `specs_of_params`, optimizer-state leaves mirroring
  their parameter (`sharding.opt_state_specs`), step and rng replicated."""
  named = lambda spec: NamedSharding(mesh, spec)
  is_spec = lambda x: isinstance(x, P)
  p = jax.tree_util.tree_map(named, specs_of_params, is_leaf=is_spec)
  o = jax.tree_util.tree_map(named, sharding.opt_state_specs(state_shapes.opt_state, state_shapes.params,
                                                             specs_of_params), is_leaf=is_spec)
  return TrainState(step=named(P()), params=p, ema_params=p, opt_state=o, rng=named(P()))
