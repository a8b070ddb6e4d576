"""One attention entry point for the flow transformer: plain-XLA reference or the Pallas flash kernel.

`impl` (config: `model.attention_impl`):
  "xla"     einsum scores + float32 softmax + einsum; XLA fuses it, memory O(L^2) per head. The reference.
  "pallas"  the flash kernel of `elf_jax.ops.pallas.flash_attention` (Mosaic on TPU, Triton on GPU, the Pallas
            interpreter on CPU): memory O(L) per head, recomputation in the backward.
  "auto"    "pallas" on TPU / GPU when L >= AUTO_PALLAS_MIN_LENGTH, else "xla"; always "xla" on CPU.

Both use the backend's default matmul precision for the input dtype (on CPU they agree to ~1e-6 in float32). The
platform is that of the mesh being traced for when one is active (`jax.sharding.get_abstract_mesh()`, e.g. TPU when
compiling ahead of time for a TPU slice from a CPU host), else jax.default_backend().

Under a mesh: a `pallas_call` has no sharding rule, so XLA would gather its operands onto every device. When an
abstract mesh is active (the train step traces under one, and `jax.shard_map` bodies see theirs), "pallas" runs the
kernel per shard inside `jax.shard_map`: the batch split over the free batch axes ("data", "fsdp") and the heads
over "tensor", each where it divides; axes already manual (an enclosing shard_map) are already per shard.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from elf_jax.ops.pallas import flash_attention as flash
from elf_jax.parallel.mesh import BATCH_AXES

HEAD_AXIS = "tensor"  # the mesh axis that splits attention heads (elf_jax.parallel.mesh.MESH_AXES)

IMPLS = ("xla", "pallas", "auto")
# Sequence length from which "auto" uses the flash kernel on TPU / GPU. Below it the L x L float32 scores of one
# head (<= 1 MiB) are cheap for XLA and the kernel's padding of L and D to its tiles costs more than it saves;
# ELF's full-length blocks (L = 1036) are above it. Re-tune with benchmarks/attention.py on the target chip.
AUTO_PALLAS_MIN_LENGTH = 512
_KERNEL_BACKENDS = ("tpu", "gpu")


def resolve_impl(impl: str, seq_len: int, backend: str | None = None) -> str:
  """The concrete implementation ("xla" | "pallas") that `impl` selects for this length on `backend`.

  Args:
    impl: "xla" | "pallas" | "auto".
    seq_len: L, tokens per sequence.
    backend: jax backend name ("cpu" | "gpu" | "tpu"); None = the traced-for platform (`flash.trace_platform`).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS} (config: model.attention_impl)")
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
  scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, flash.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bnqk,bknd->bqnd", probs, v.astype(jnp.float32))
  return out.astype(q.dtype)


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


def shard_axes(mesh: jax.sharding.AbstractMesh, batch: int, heads: int) -> tuple[tuple[str, ...], str | None]:
  """The mesh axes to split (batch, heads) over: the non-manual batch axes of size > 1 whose running product
  divides `batch`, and HEAD_AXIS if it is non-manual, > 1 and divides `heads` (else None)."""
  free = [a for a in mesh.axis_names if a not in mesh.manual_axes and mesh.shape[a] > 1]
  batch_axes, ways = [], 1
  for axis in BATCH_AXES:
    if axis in free and batch % (ways * mesh.shape[axis]) == 0:
      batch_axes.append(axis)
      ways *= mesh.shape[axis]
  head_axis = HEAD_AXIS if HEAD_AXIS in free and heads % mesh.shape[HEAD_AXIS] == 0 else None
  return tuple(batch_axes), head_axis


def per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array) -> jax.Array:
  """`kernel(q, k, v, key_mask)` once per (batch, head) shard of the active abstract mesh (see module docstring);
  a plain call when no mesh is active or no axis splits. Shapes as in `attention`; key_mask (B, L) bool."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, key_mask)
  batch_axes, head_axis = shard_axes(mesh, q.shape[0], q.shape[2])
  if not batch_axes and head_axis is None:
    return kernel(q, k, v, key_mask)
  rows = batch_axes or None
  qkv = P(rows, None, head_axis, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv,
                       axis_names=frozenset(batch_axes + ((head_axis,) if head_axis else ())),
                       check_vma=False)(q, k, v, key_mask)
