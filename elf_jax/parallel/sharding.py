"""Declared sharding: logical axis names → mesh axes through one rule table (`config.mesh.rules`).

Parameters carry logical names (see `elf_jax.model.layers`); the rules map each to a mesh axis (or None =
replicated); `objective.state.state_shardings` applies them to a whole boxed TrainState.
Batches are sharded along their first axis over the batch axes ("data", "fsdp").
"""
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from elf_jax.config import ConfigError
from elf_jax.parallel.mesh import batch_axes, num_batch_shards


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` (default `elf_jax.config.SHARDING_RULES`) as a tuple of (logical, mesh axis) pairs."""
  return tuple(tuple(r) for r in config.mesh.rules)


def check_mesh(mesh: jax.sharding.Mesh, num_heads: int, batch_size: int | None = None) -> None:
  """The mesh must split the heads (tensor) and the per-step batch (data x fsdp; None = not checked) evenly: one
  clear error if not."""
  shards = num_batch_shards(mesh)
  problems = []
  if num_heads % mesh.shape["tensor"]:
    problems.append(f"model.num_heads={num_heads} is not divisible by mesh.tensor={mesh.shape['tensor']}")
  if batch_size is not None and batch_size % shards:
    problems.append(f"the per-step batch {batch_size} (optim.global_batch_size / optim.grad_accum_steps) is not "
                    f"divisible by the {shards} batch shards (mesh.data x mesh.fsdp)")
  if problems:
    raise ConfigError(f"the mesh {dict(mesh.shape)} does not fit: " + "; ".join(problems) +
                     ". Fix: choose --config.mesh.data/fsdp/tensor (or --config.mesh.preset) accordingly.")


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
    raise ConfigError(f"the mesh {dict(mesh.shape)} does not divide these {what}s: " + "; ".join(problems) +
                     ". Fix: change --config.mesh.fsdp/tensor (e.g. a tensor size that divides the number of heads"
                     " and the vocabulary) or --config.mesh.rules.")


def batch_spec(mesh) -> P:
  return P(batch_axes(mesh))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))
