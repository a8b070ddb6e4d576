"""One attention entry point for the flow transformer: plain-XLA reference or the Pallas flash kernel.

`impl` (config: `model.attention_impl`):
  "xla"     einsum scores + float32 softmax + einsum; XLA fuses it, memory O(L^2) per head. The reference.
  "pallas"  the flash kernel of `elf_jax.ops.pallas.flash_attention` (Mosaic on TPU, Triton on GPU, the Pallas
            interpreter on CPU): memory O(L) per head, recomputation in the backward.
  "auto"    "pallas" on TPU / GPU when L >= AUTO_PALLAS_MIN_LENGTH, else "xla"; always "xla" on CPU.

Both use the backend's default matmul precision for the input dtype (on CPU they agree to ~1e-6 in float32); the
backend is jax.default_backend() at trace time, so ahead-of-time compilation for TPU from a CPU host sees "cpu".
"""
import math

import jax
import jax.numpy as jnp

from elf_jax.ops.pallas import flash_attention as flash

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
    backend: jax backend name ("cpu" | "gpu" | "tpu"); None = jax.default_backend().
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS} (config: model.attention_impl)")
  if impl != "auto":
    return impl
  backend = jax.default_backend() if backend is None else backend
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
    interpret = jax.default_backend() == "cpu"
  return flash.flash_attention(q, k, v, key_mask, block_q=block_q, block_k=block_k, interpret=interpret)
