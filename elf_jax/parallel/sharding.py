"""Declared sharding: logical axis names → mesh axes through one rule table (`config.mesh.rules`).

Parameters carry logical names (see `elf_jax.model.layers`); the rules map each to a mesh axis (or None =
replicated). Optimizer state leaves that mirror a parameter take that parameter's spec; scalars are replicated.
Batches are sharded along their first axis over the batch axes ("data", "fsdp").
"""
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from elf_jax.parallel.mesh import batch_axes
from elf_jax.train.state import TrainState



def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` (default `elf_jax.config.SHARDING_RULES`) as a tuple of (logical, mesh axis) pairs."""
  return tuple(tuple(r) for r in config.mesh.rules)


def param_specs(boxed_params, rules) -> Any:
  """PartitionSpecs for a parameter tree whose leaves are `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape`)."""
  return nn.logical_to_mesh(nn.get_partition_spec(boxed_params), rules)


def check_divisible(shapes, specs, mesh: jax.sharding.Mesh, what: str = "parameter"):
  """Raises one error naming every leaf whose sharded dimension the mesh axis does not divide."""
  problems = []
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, P))):
    for dim, axes in zip(leaf.shape, tuple(spec)):
      if axes is None:
        continue
      size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
      if dim % size:
        problems.append(f"{jax.tree_util.keystr(path)} dim {dim} over mesh axes {axes} (size {size})")
  if problems:
    raise ValueError(f"the mesh {dict(mesh.shape)} does not divide these {what}s: " + "; ".join(problems) +
                     ". Fix: change --config.mesh.fsdp/tensor (e.g. a tensor size that divides the number of heads"
                     " and the vocabulary) or --config.mesh.rules.")


def opt_state_specs(optimizer: optax.GradientTransformation, opt_state_shapes, specs_of_params):
  """Specs for an optimizer state: parameter-shaped leaves follow their parameter; everything else replicated."""
  return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state_shapes, specs_of_params,
                               transform_non_params=lambda _: P(),
                               is_leaf=lambda x: isinstance(x, P))


def state_shardings(mesh, optimizer, state_shapes: TrainState, specs_of_params) -> TrainState:
  """NamedShardings for a whole TrainState (params and EMA alike, optimizer state mirrored)."""
  named = lambda spec: NamedSharding(mesh, spec)
  is_spec = lambda x: isinstance(x, P)
  p = jax.tree_util.tree_map(named, specs_of_params, is_leaf=is_spec)
  o = jax.tree_util.tree_map(named, opt_state_specs(optimizer, state_shapes.opt_state, specs_of_params),
                             is_leaf=is_spec)
  return TrainState(step=named(P()), params=p, ema_params=p, opt_state=o, rng=named(P()))


def batch_spec(mesh) -> P:
  return P(batch_axes(mesh))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))
