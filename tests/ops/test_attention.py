"""Attention entry point: the Pallas flash kernel (interpret mode on CPU) against the XLA reference, the reference
against a float64 NumPy softmax, and the compiled kernels exported for GPU (Triton) and TPU (Mosaic) from this CPU
host."""
import re

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.ops import attention as attn
from elf_jax.ops.pallas import flash_attention as flash

# Tiny shapes, small blocks: L = 45 pads to 48 (a multiple of both blocks); interpret mode is slow.
BATCH, SEQ, HEADS = 2, 45, 2
BLOCKS = dict(block_q=16, block_k=8)
VALID_LENGTHS = (45, 29)  # example 1 has 16 padded keys, across a block boundary
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(head_dim, dtype, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, d_out = (jax.random.normal(key, (BATCH, SEQ, HEADS, head_dim), jnp.float32) for key in keys)
  mask = jnp.arange(SEQ)[None, :] < jnp.array(VALID_LENGTHS)[:, None]
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, d_out


def _out_and_grads(impl, q, k, v, mask, d_out):
  """Output and d<out, d_out>/d(q, k, v), all as float32 NumPy arrays."""
  def loss(q, k, v):
    out = attn.attention(q, k, v, mask, impl=impl, **BLOCKS)
    return jnp.sum(out.astype(jnp.float32) * d_out), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def _numpy_attention(q, k, v, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask)[:, None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknd->bqnd", probs, v)


def test_xla_reference_matches_numpy():
  q, k, v, mask, _ = _inputs(66, jnp.float32)
  np.testing.assert_allclose(attn.xla_attention(q, k, v, mask), _numpy_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 66, 80])
def test_pallas_matches_xla_forward_and_grads(head_dim, dtype):
  inputs = _inputs(head_dim, dtype)
  got = _out_and_grads("pallas", *inputs)
  want = _out_and_grads("xla", *inputs)
  assert attn.attention(*inputs[:4], impl="pallas", **BLOCKS).dtype == dtype
  tol = TOLERANCE[dtype]
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=name)


def test_pallas_ignores_masked_keys_and_none_mask_means_all_valid():
  q, k, v, mask, _ = _inputs(64, jnp.float32)
  out = attn.attention(q, k, v, mask, impl="pallas", **BLOCKS)
  garbage = jnp.where(mask[:, :, None, None], 0.0, 1e3)
  np.testing.assert_array_equal(out, attn.attention(q, k + garbage, v - garbage, mask, impl="pallas", **BLOCKS))
  all_valid = jnp.ones((BATCH, SEQ), bool)
  np.testing.assert_array_equal(attn.attention(q, k, v, None, impl="pallas", **BLOCKS),
                                attn.attention(q, k, v, all_valid, impl="pallas", **BLOCKS))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_fully_masked_rows_stay_finite(impl):
  q, k, v, _, d_out = _inputs(64, jnp.float32)
  mask = jnp.zeros((BATCH, SEQ), bool).at[0].set(True)  # example 1: no valid key at all
  for x in _out_and_grads(impl, q, k, v, mask, d_out):
    assert np.all(np.isfinite(x))


def test_auto_selects_xla_on_cpu_and_pallas_on_accelerators_above_threshold():
  long = attn.AUTO_PALLAS_MIN_LENGTH
  assert attn.resolve_impl("auto", long, "cpu") == "xla"
  assert attn.resolve_impl("auto", long, "tpu") == "pallas"
  assert attn.resolve_impl("auto", long, "gpu") == "pallas"
  assert attn.resolve_impl("auto", long - 1, "tpu") == "xla"
  assert attn.resolve_impl("pallas", 8, "cpu") == "pallas"
  q, k, v, mask, _ = _inputs(64, jnp.float32)
  np.testing.assert_array_equal(attn.attention(q, k, v, mask, impl="auto"), attn.xla_attention(q, k, v, mask))


def test_bad_arguments_raise_clear_errors():
  q, k, v, mask, _ = _inputs(64, jnp.float32)
  with pytest.raises(ValueError, match="model.attention_impl='flash': expected one of xla, pallas, auto"):
    attn.attention(q, k, v, mask, impl="flash")
  with pytest.raises(ValueError, match="key_mask must be"):
    attn.attention(q, k, v, mask[:, :-1], impl="pallas", **BLOCKS)
  with pytest.raises(ValueError, match="not 'cpu'; pass interpret=True"):
    attn.attention(q, k, v, mask, impl="pallas", interpret=False)
  with pytest.raises(ValueError, match="platform 'tpu'.*or 'gpu'.*not 'cuda'"):
    flash.flash_attention(q, k, v, mask, platform="cuda")
  with pytest.raises(ValueError, match="share one dtype"):
    attn.attention(q, k.astype(jnp.bfloat16), v, mask, impl="pallas", **BLOCKS)


# jax.export platform → (the kernel's `platform`, its custom-call target). Triton calls carry no compatibility
# guarantee, so exporting them needs the safety check disabled; Mosaic's `tpu_custom_call` is allow-listed.
EXPORT_TARGETS = {"cuda": ("gpu", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("export_platform", list(EXPORT_TARGETS))
def test_kernel_forward_and_backward_export_for_accelerators(export_platform):
  """Lowering for the accelerator (no interpreter): the forward and both backward passes (dQ, dK/dV) are one
  custom call each, at head dim 66 (padded to the platform's tile) and bfloat16."""
  platform, target = EXPORT_TARGETS[export_platform]
  q, _, _, mask, _ = _inputs(66, jnp.bfloat16)

  def forward_and_backward(q, k, v, mask):
    loss = lambda q, k, v: jnp.sum(flash.flash_attention(q, k, v, mask, platform=platform).astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  args = [jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3 + [jax.ShapeDtypeStruct(mask.shape, mask.dtype)]
  exported = export.export(jax.jit(forward_and_backward), platforms=(export_platform,),
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(*args)
  assert exported.platforms == (export_platform,)
  assert re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()) == [target] * 3
  assert [a.shape for a in exported.out_avals] == [()] + [q.shape] * 3
  assert [a.dtype for a in exported.out_avals[1:]] == [jnp.bfloat16] * 3
