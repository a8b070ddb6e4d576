"""One attention entry point for the flow transformer: plain-XLA reference or the Pallas flash kernel.

`impl` (config: `model.attention_impl`) is "xla", "pallas" or "auto". Precision, platform choice and how the
Pallas kernel runs under a mesh (shard_map, padding): docs/model.md#attention.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from elf_jax.config import ATTENTION_IMPLS, check_choice
from elf_jax.ops.pallas import flash_attention as flash
from elf_jax.parallel.mesh import BATCH_AXES

HEAD_AXIS = "tensor"  # the mesh axis that splits attention heads (elf_jax.config.MESH_AXES)

# Sequence length from which "auto" uses the flash kernel on TPU / GPU. Below it the L x L float32 scores of one
# head (<= 1 MiB) are cheap for XLA and the kernel's padding of L and D to its tiles costs more than it saves;
# ELF's full-length blocks (L = 1036) are above it. Re-tune with benchmarks/attention.py on the target chip.
AUTO_PALLAS_MIN_LENGTH = 512
_KERNEL_BACKENDS = ("tpu", "gpu")


def resolve_impl(impl: str, seq_len: int, backend: str | None = None) -> str:
  """The concrete implementation ("xla" | "pallas") that `impl` selects for this length on `backend`.

  Args:
    impl: one of config.ATTENTION_IMPLS.
    seq_len: L, tokens per sequence.
    backend: jax backend name ("cpu" | "gpu" | "tpu"); None = the traced-for platform (`flash.trace_platform`).
  """
  check_choice("model.attention_impl", impl, ATTENTION_IMPLS)
  if impl != "auto":
    return impl
  backend = flash.trace_platform() if backend is None else backend
  use_kernel = backend in _KERNEL_BACKENDS and seq_len >= AUTO_PALLAS_MIN_LENGTH
  return "pallas" if use_kernel else "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Reference attention in plain jnp: (B, L, N, D) inputs, (B, L) bool key mask or None -> (B, L, N, D).

  Scores are scaled by 1/sqrt(D); scores, softmax and the weighted sum are float32; output in q's dtype.
  Masked keys get a large finite negative score, so a fully masked row averages v instead of giving NaN.
  """
  # Heads-major (B, N, L, D) operands: both matmuls then batch over (B, N) with row-major tiles, which XLA:CPU's
  # fused matmul + softmax runs ~3x faster than on the (B, L, N, D) layout (same products and sums).
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  scores = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, flash.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnqk,bnkd->bnqd", probs, v.astype(jnp.float32))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *, impl: str = "xla",
              interpret: bool | None = None, block_q: int | None = None, block_k: int | None = None) -> jax.Array:
  """Non-causal multi-head attention with a key-padding mask.

  Args:
    q, k, v: (B, L, N, D) float32 or bfloat16, already QK-normed and rotated.
    key_mask: (B, L) bool, True = key may be attended; None = all keys valid.
    impl: "xla" | "pallas" | "auto" (see module docstring).
    interpret: Pallas only: run the kernel in the Pallas interpreter; None = iff the backend is CPU.
    block_q, block_k: Pallas only: query / key block lengths; None = the kernel's per-platform defaults.

  Returns:
    (B, L, N, D) in q's dtype: softmax(q k^T / sqrt(D)) v per head, softmax and accumulation in float32.
  """
  if resolve_impl(impl, q.shape[1]) == "xla":
    return xla_attention(q, k, v, key_mask)
  if interpret is None:
    interpret = flash.trace_platform() == "cpu"
  if key_mask is None:
    key_mask = jnp.ones(q.shape[:2], bool)
  kernel = functools.partial(flash.flash_attention, block_q=block_q, block_k=block_k, interpret=interpret)
  return per_shard(kernel, q, k, v, key_mask)


def shard_plan(mesh: jax.sharding.AbstractMesh) -> tuple[tuple[str, ...], str | None, tuple[str, ...]]:
  """How `per_shard` splits over `mesh`: (batch axes, head axis or None, every non-manual axis).

  The batch axes are the non-manual BATCH_AXES of size > 1; the head axis is HEAD_AXIS if it is non-manual and
  > 1. The third entry also holds the size-1 axes: the kernel's shard_map makes all of them manual.
  """
  free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  batch_axes = tuple(a for a in BATCH_AXES if a in free and mesh.shape[a] > 1)
  head_axis = HEAD_AXIS if HEAD_AXIS in free and mesh.shape[HEAD_AXIS] > 1 else None
  return batch_axes, head_axis, free


def _pad_to_multiple(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`x` zero-padded at the end of `axis` to a multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> jax.Array:
  """`kernel(q, k, v, key_mask)` once per (rows, heads) shard of the active abstract mesh (module docstring),
  rows and heads padded to multiples of their shard counts; a plain call when no mesh is active or every axis is
  already manual. Shapes as in `attention`; key_mask (B, L) bool."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, key_mask)
  batch_axes, head_axis, free = shard_plan(mesh)
  if not free:
    return kernel(q, k, v, key_mask)
  batch, _, heads, _ = q.shape
  row_ways = math.prod(mesh.shape[a] for a in batch_axes)
  head_ways = mesh.shape[head_axis] if head_axis else 1
  pad = lambda x: _pad_to_multiple(_pad_to_multiple(x, 0, row_ways), 2, head_ways)
  mask = _pad_to_multiple(key_mask, 0, row_ways)  # padded rows: no valid key (finite, sliced off below)
  rows = batch_axes or None
  qkv = P(rows, None, head_axis, None)
  out = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv,
                      axis_names=frozenset(free), check_vma=False)(pad(q), pad(k), pad(v), mask)
  return out[:batch, :, :heads]
