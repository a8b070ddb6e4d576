"""TrainState: everything a training run carries from step to step (and into every checkpoint)."""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def logical_specs(boxed_tree):
  """`nn.get_partition_spec` of a boxed tree, except that a box holding no array stays the empty node it holds: optax
  puts its `MaskedNode` inside the parameter's box for leaves a transform leaves out (Muon's Adam part skips the
  matrices), and `nn.unbox` of the tree has that node there, not a leaf."""
  def spec(x):
    if isinstance(x, nn.meta.AxisMetadata):
      value = x.unbox()
      return x.get_partition_spec() if jax.tree.leaves(value) else value
    return P() if hasattr(x, "shape") else None
  return jax.tree.map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(mesh: jax.sharding.Mesh, boxed_state_shapes: TrainState, rules) -> TrainState:
  """NamedShardings for a whole TrainState from its boxed shapes (`step.init_boxed_state` under `jax.eval_shape`):
  every boxed leaf (params, EMA and the optimizer moments that mirror them) by its logical axis names and `rules`,
  everything else (step, rng, counters) replicated. One clear error if the mesh does not divide a parameter."""
  specs = nn.logical_to_mesh(logical_specs(boxed_state_shapes), rules)
  sharding.check_divisible(nn.unbox(boxed_state_shapes).params, specs.params, mesh)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))
