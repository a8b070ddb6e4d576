"""Flash attention in Pallas: non-causal, key-padding mask, custom flash backward.

One kernel body per pass serves Mosaic (TPU), Triton (GPU) and the Pallas interpreter (CPU). Grid, online
softmax, internal layout and padding: docs/model.md#flash-attention-kernel.
"""
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# Finite stand-in for -inf on masked scores: a fully masked row then degrades to a uniform average, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Default (block_q, block_k) per platform. GPU: 64 keeps a float32 query block plus two pipelined key/value blocks
# of head dim 128 within shared memory; TPU: 128 = the lane width, so key-mask blocks are lane-dense.
DEFAULT_BLOCKS = {"gpu": (64, 64), "tpu": (128, 128), "interpret": (128, 128)}
PLATFORMS = tuple(DEFAULT_BLOCKS)
_TPU_LANES = 128  # TPU vreg lane width: head dims are padded to a multiple of it
_GPU_MIN_DIM = 16  # Triton's tl.dot needs every dimension >= 16 (and a power of two)
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def trace_platform() -> str:
  """The platform being traced for: the active abstract mesh's ("tpu" when compiling ahead of time for a TPU slice
  from a CPU host), else jax.default_backend()."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return getattr(device, "platform", None) or jax.default_backend()


def padded_head_dim(head_dim: int, platform: str) -> int:
  """Head dim padded to the hardware tile: next power of two (>= 16) on GPU, a multiple of 128 elsewhere."""
  if platform == "gpu":
    return max(_GPU_MIN_DIM, pl.next_power_of_2(head_dim))
  return pl.cdiv(head_dim, _TPU_LANES) * _TPU_LANES


def _compiler_params(platform: str, grid_rank: int):
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  return None


def _dot(a, b, dims):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores(q, k, valid, scale):
  """Masked float32 scores (bq, bk) of a query block against a key block; `valid` is (1, bk) bool."""
  return jnp.where(valid, _dot(q, k, _NT) * scale, MASK_VALUE)


def _fwd_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, block_k, scale):
  """One query block against all keys. Refs: q (bq, Dp), k/v (Lp, Dp), mask (nk, 1, bk); out o (bq, Dp), lse (bq, 1)."""
  q = q_ref[...]
  block_q, head_dim = q.shape

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    v = v_ref[keys, :]
    s = _scores(q, k_ref[keys, :], mask_ref[j] != 0, scale)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + _dot(p.astype(v.dtype), v, _NN)
    return m_new, l, acc

  init = (jnp.full((block_q, 1), MASK_VALUE, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = lax.fori_loop(0, mask_ref.shape[0], body, init)
  # l >= 1: the row maximum contributes exp(0).
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_k, scale):
  """dQ of one query block, looping over key blocks. Refs as in `_fwd_kernel`; do (bq, Dp), lse/delta (bq, 1)."""
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(j, dq):
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k = k_ref[keys, :]
    p = jnp.exp(_scores(q, k, mask_ref[j] != 0, scale) - lse)
    ds = p * (_dot(do, v_ref[keys, :], _NT) - delta)
    return dq + _dot(ds.astype(k.dtype), k, _NN)

  dq = lax.fori_loop(0, mask_ref.shape[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, scale):
  """dK, dV of one key block, looping over query blocks. Refs: q/do (Lp, Dp), lse/delta (Lp, 1), k/v (bk, Dp),
  mask (1, bk); out dk/dv (bk, Dp)."""
  k, v = k_ref[...], v_ref[...]
  valid = mask_ref[...] != 0

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p = jnp.exp(_scores(q, k, valid, scale) - lse_ref[rows, :])
    ds = p * (_dot(do, v, _NT) - delta_ref[rows, :])
    return dk + _dot(ds.astype(q.dtype), q, _TN), dv + _dot(p.astype(do.dtype), do, _TN)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(block_q, block_k, seq_len, head_dim, num_k_blocks, over_keys):
  """BlockSpecs for (q, k, v, mask, do, lse, delta) on grid (B, N, blocks) of the query or the key axis."""
  def block(rows):
    return pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0))

  def whole(cols):
    return pl.BlockSpec((None, None, seq_len, cols), lambda b, h, i: (b, h, 0, 0))

  if over_keys:
    mask = pl.BlockSpec((None, None, 1, block_k), lambda b, h, i: (b, i, 0, 0))
    return [whole(head_dim), block(block_k), block(block_k), mask, whole(head_dim), whole(1), whole(1)]
  mask = pl.BlockSpec((None, num_k_blocks, 1, block_k), lambda b, h, i: (b, 0, 0, 0))
  row = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i: (b, h, i, 0))
  return [block(block_q), whole(head_dim), whole(head_dim), mask, block(block_q), row, row]


def _call(kernel, grid, out_shape, in_specs, out_specs, platform):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=_compiler_params(platform, len(grid)), interpret=platform == "interpret")


def _forward(q, k, v, mask, block_q, block_k, scale, platform):
  batch, heads, seq_len, head_dim = q.shape
  num_k_blocks = mask.shape[1]
  specs = _specs(block_q, block_k, seq_len, head_dim, num_k_blocks, over_keys=False)
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((batch, heads, seq_len, 1), jnp.float32))
  kernel = functools.partial(_fwd_kernel, block_k=block_k, scale=scale)
  call = _call(kernel, (batch, heads, seq_len // block_q), out_shape, specs[:4], [specs[0], specs[5]], platform)
  return call(q, k, v, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, block_q, block_k, scale, platform):
  return _forward(q, k, v, mask, block_q, block_k, scale, platform)[0]


def _flash_fwd(q, k, v, mask, block_q, block_k, scale, platform):
  out, lse = _forward(q, k, v, mask, block_q, block_k, scale, platform)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(block_q, block_k, scale, platform, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  batch, heads, seq_len, head_dim = q.shape
  num_k_blocks = mask.shape[1]
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  args = (q, k, v, mask, d_out, lse, delta)

  q_specs = _specs(block_q, block_k, seq_len, head_dim, num_k_blocks, over_keys=False)
  dq_kernel = functools.partial(_dq_kernel, block_k=block_k, scale=scale)
  dq = _call(dq_kernel, (batch, heads, seq_len // block_q), jax.ShapeDtypeStruct(q.shape, q.dtype), q_specs,
             q_specs[0], platform)(*args)

  k_specs = _specs(block_q, block_k, seq_len, head_dim, num_k_blocks, over_keys=True)
  dkv_kernel = functools.partial(_dkv_kernel, block_q=block_q, scale=scale)
  out_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  dk, dv = _call(dkv_kernel, (batch, heads, num_k_blocks), out_shape, k_specs, [k_specs[1], k_specs[2]],
                 platform)(*args)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *,
                    block_q: int | None = None, block_k: int | None = None, interpret: bool = False,
                    platform: str | None = None) -> jax.Array:
  """Non-causal softmax(q k^T / sqrt(D)) v with a key-padding mask, differentiable in q, k, v.

  Args:
    q, k, v: (B, L, N, D) float32 or bfloat16 (same dtype), any L and D.
    key_mask: (B, L) bool, True = key may be attended; None = all keys valid.
    block_q, block_k: query / key block lengths (L is padded to a multiple of both); None = DEFAULT_BLOCKS of
      the platform. On TPU multiples of 128 (lane-dense key mask), on GPU powers of two >= 16; any size >= 1 in
      interpret mode.
    interpret: run the Pallas interpreter (CPU) instead of compiling with Mosaic / Triton.
    platform: compile for "tpu" (Mosaic) or "gpu" (Triton); None = the platform being traced for
      (`trace_platform`). Give it when lowering for another platform than the host's, e.g. under
      `jax.export(..., platforms=("cuda",))` on a CPU host. Ignored with interpret=True.

  Returns:
    (B, L, N, D) in q's dtype.
  """
  if not (q.shape == k.shape == v.shape and q.ndim == 4):
    raise ValueError(f"q, k, v must share one (B, L, N, D) shape; got {q.shape}, {k.shape}, {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  batch, seq_len, _, head_dim = q.shape
  if key_mask is None:
    key_mask = jnp.ones((batch, seq_len), bool)
  if key_mask.shape != (batch, seq_len):
    raise ValueError(f"key_mask must be (B, L) = {(batch, seq_len)}; got {key_mask.shape}")
  platform = "interpret" if interpret else platform or trace_platform()
  if platform not in PLATFORMS:
    raise ValueError(f"Pallas kernels compile only for platform 'tpu' (Mosaic) or 'gpu' (Triton, also for "
                     f"jax.export's 'cuda'), not {platform!r}; pass interpret=True to run them in the Pallas "
                     "interpreter, or use impl='xla'")
  default_q, default_k = DEFAULT_BLOCKS[platform]
  block_q = default_q if block_q is None else block_q
  block_k = default_k if block_k is None else block_k
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block sizes must be positive; got block_q={block_q}, block_k={block_k}")

  padded_len = pl.cdiv(seq_len, math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
  padded_dim = padded_head_dim(head_dim, platform)

  def to_kernel_layout(x):  # (B, L, N, D) -> (B, N, Lp, Dp)
    x = jnp.pad(x, ((0, 0), (0, padded_len - seq_len), (0, 0), (0, padded_dim - head_dim)))
    return x.transpose(0, 2, 1, 3)

  mask = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)))
  mask = mask.reshape(batch, padded_len // block_k, 1, block_k)
  out = _flash(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v), mask, block_q, block_k,
               1.0 / math.sqrt(head_dim), platform)
  return out.transpose(0, 2, 1, 3)[:, :seq_len, :, :head_dim]
