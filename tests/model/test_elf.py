"""The flow transformer: parity with the reference implementation's outputs, parameter names and counts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import (
  ELF,
  ModelConfig,
  count_params,
  init_params,
  layer_dropout_rates,
  stack_blocks,
  unstack_blocks,
)
from elf_jax.weights import published

from tests.conftest import tiny_fixture_model


@pytest.mark.parametrize("layout", ["checkpoint_7", "orbax_checkpoint_7"])
def test_reference_forward_parity(tiny_fixture_dir, layout):
  """Denoiser x̂ (with and without mask) and decoder logits equal the reference network's to 1e-5."""
  model = tiny_fixture_model(tiny_fixture_dir)
  expected = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  params = published.load_published_elf(tiny_fixture_dir / layout, which="ema", expected=expected)
  assert ModelConfig.from_params(params) == dataclasses.replace(model.config, mlp_hidden=model.config.swiglu_hidden)
  ref = np.load(tiny_fixture_dir / "reference.npz")
  x, t, w, mask = ref["x"], ref["t"], ref["w"], ref["mask"]
  assert np.abs(ref["out_den"] - ref["out_den_nomask"]).max() > 1e-3  # the mask matters in this fixture

  out = model.apply({"params": params}, x, t, w, mask)
  np.testing.assert_allclose(out, ref["out_den"], atol=1e-5, rtol=0)
  out = model.apply({"params": params}, x, t, w)
  np.testing.assert_allclose(out, ref["out_den_nomask"], atol=1e-5, rtol=0)
  logits = model.apply({"params": params}, x, jnp.ones_like(t), w, mask, decode=True)
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


def test_raw_params_differ_from_ema(tiny_fixture_dir):
  """`which='raw'` returns the raw parameters (the fixture's EMA copy is 0.9 × raw), giving other outputs."""
  model = tiny_fixture_model(tiny_fixture_dir)
  raw = published.load_published_elf(tiny_fixture_dir / "checkpoint_7", which="raw")
  ref = np.load(tiny_fixture_dir / "reference.npz")
  out = model.apply({"params": raw}, ref["x"], ref["t"], ref["w"], ref["mask"])
  assert np.abs(out - ref["out_den"]).max() > 1e-3


# (depth, hidden, heads) of ELF-B/M/L; the published totals (docs/method.md#network) count every parameter of the
# network with C = 512 and V = 32100, the readout head (proj_* + unembed_*) included; the frozen T5 encoder is not part
# of it.
SIZES = {"B": ((12, 768, 12), 104.58e6, 16.86e6), "M": ((24, 1056, 16), 342.54e6, 17.01e6),
         "L": ((32, 1280, 16), 652.10e6, 17.12e6)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameter_counts(size):
  (depth, hidden, heads), total, head = SIZES[size]
  mc = ModelConfig.from_config(base_config(), latent_dim=512, vocab_size=32100, depth=depth, hidden_size=hidden,
                               num_heads=heads)
  shapes = nn.unbox(jax.eval_shape(lambda: init_params(ELF(mc), jax.random.key(0))))
  assert abs(count_params(shapes) - total) < 0.005e6
  readout = sum(int(np.prod(shapes[k].shape)) for k in ("proj_kernel", "proj_bias", "unembed_kernel", "unembed_bias"))
  assert abs(readout - head) < 0.005e6


def _flat_shapes(tree):
  return {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _small_model_config(**overrides) -> ModelConfig:
  return ModelConfig.from_config(base_config(), **{**dict(latent_dim=16, hidden_size=32, depth=2, num_heads=4,
                                                          bottleneck_dim=8, vocab_size=20), **overrides})


def test_parameter_names_match_spec():
  """Unstacked, every name of docs/method.md#checkpoint-names is present with the documented shape and nothing else is;
  stacked, each block leaf has the leading layer axis (logical name "layers") and `stack_blocks` inverts
  `unstack_blocks`."""
  mc = _small_model_config()
  boxed = init_params(ELF(mc), jax.random.key(0))
  p = nn.unbox(boxed)
  flat = _flat_shapes(unstack_blocks(p))
  stacked = _flat_shapes(p)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for path, box in jax.tree_util.tree_flatten_with_path(boxed["blocks"], is_leaf=is_box)[0]:
    name = "/".join(k.key for k in path)
    assert stacked[f"blocks/{name}"] == (mc.depth,) + flat[f"blocks_0/{name}"] and box.names[0] == "layers", name
  assert not [k for k in p if k.startswith("blocks_")]
  assert jax.tree.structure(stack_blocks(unstack_blocks(p))) == jax.tree.structure(p)
  assert ModelConfig.from_params(unstack_blocks(p)) == ModelConfig.from_params(p)
  h, c, v, f = 32, 16, 20, int(int(4 * 32) * 2 / 3)
  expected = {
      "self_cond_proj/kernel": (2 * c, c), "self_cond_proj/bias": (c,), "text_proj/proj1/kernel": (c, 8),
      "text_proj/proj2/kernel": (8, h), "text_proj/proj2/bias": (h,), "mode_tokens": (1, 4, h),
      "t_emb_tokens": (1, 4, h), "self_cond_cfg_tokens": (1, 4, h), "proj_kernel": (h, c), "proj_bias": (c,),
      "unembed_kernel": (c, v), "unembed_bias": (v,), "final_layer/norm_final/weight": (h,),
      "final_layer/linear/kernel": (h, c), "final_layer/linear/bias": (c,)}
  for emb in ("t_embedder", "self_cond_cfg_embedder"):
    expected.update({f"{emb}/mlp_0/kernel": (256, h), f"{emb}/mlp_0/bias": (h,), f"{emb}/mlp_2/kernel": (h, h),
                     f"{emb}/mlp_2/bias": (h,)})
  for i in range(2):
    b = f"blocks_{i}"
    expected.update({
        f"{b}/norm1/weight": (h,), f"{b}/norm2/weight": (h,), f"{b}/attn/qkv/kernel": (h, 3 * h),
        f"{b}/attn/qkv/bias": (3 * h,), f"{b}/attn/q_norm/weight": (h // 4,), f"{b}/attn/k_norm/weight": (h // 4,),
        f"{b}/attn/proj/kernel": (h, h), f"{b}/attn/proj/bias": (h,), f"{b}/mlp/w12/kernel": (h, 2 * f),
        f"{b}/mlp/w12/bias": (2 * f,), f"{b}/mlp/w3/kernel": (f, h), f"{b}/mlp/w3/bias": (h,)})
  assert flat == expected


def test_zero_init_final_layer_and_padding_invariance():
  """Fresh init predicts x̂ = 0; valid positions do not depend on padded positions' content."""
  model = ELF(_small_model_config())
  params = nn.unbox(init_params(model, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  t, w = jnp.array([0.3, 0.7]), jnp.array([1.0, 2.0])
  assert np.abs(model.apply({"params": params}, x, t, w)).max() == 0.0
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  x2 = x.at[0, 4:].set(123.0)
  l1 = model.apply({"params": params}, x, t, w, mask, decode=True)
  l2 = model.apply({"params": params}, x2, t, w, mask, decode=True)
  np.testing.assert_allclose(l1[0, :4], l2[0, :4], atol=1e-5)
  assert np.abs(l1[0, 4:] - l2[0, 4:]).max() > 1e-3


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_unrolled_blocks_equal_the_scan(remat):
  """`model.block_loop="unrolled"` runs the same stacked parameters as the scan: the same parameter tree at init, the
  same x̂ and logits, the same gradients (per leaf, relative Frobenius ≤ 1e-5), under every remat policy."""
  scan_config = _small_model_config(depth=3, remat=remat)
  models = [ELF(dataclasses.replace(scan_config, block_loop=loop)) for loop in ("scan", "unrolled")]
  inits = [nn.unbox(init_params(m, jax.random.key(0))) for m in models]
  jax.tree.map(np.testing.assert_array_equal, *inits)
  noise = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.key(3), p.shape), inits[0])
  params = jax.tree.map(jnp.add, inits[0], noise)  # a non-zero final layer: x̂ depends on every block
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  t, w = jnp.array([0.3, 0.7]), jnp.array([1.0, 2.0])

  def loss(model, p):
    x_hat, logits = model.apply({"params": p}, x, t, w, decode=jnp.array([0.0, 1.0]))
    return jnp.sum(x_hat ** 2) + jnp.sum(jax.nn.log_softmax(logits)[..., 3]), (x_hat, logits)

  ((_, scan_out), scan), ((_, unrolled_out), unrolled) = [
      jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p), has_aux=True))(params) for m in models]
  for a, b in zip(unrolled_out, scan_out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for (path, g_scan), g_unrolled in zip(jax.tree_util.tree_leaves_with_path(scan), jax.tree.leaves(unrolled)):
    error = np.linalg.norm(g_unrolled - g_scan) / max(np.linalg.norm(g_scan), 1e-30)
    assert error <= 1e-5, (jax.tree_util.keystr(path), error)
  assert np.linalg.norm(scan["blocks"]["attn"]["qkv"]["kernel"][0]) > 0  # the first block gets a gradient


@pytest.mark.slow
@pytest.mark.parametrize("block_loop", ["scan", "unrolled"])
def test_dropout_only_in_the_middle_half_of_the_blocks(block_loop):
  """Per-layer rates: `dropout_rate` for blocks depth//4 .. depth - depth//4 - 1, 0 elsewhere. With the middle blocks'
  residual outputs zeroed the stochastic pass equals the deterministic one; with the outer ones zeroed it does not."""
  mc = _small_model_config(depth=4, dropout_rate=0.5, block_loop=block_loop)
  np.testing.assert_array_equal(layer_dropout_rates(mc), [0.0, 0.5, 0.5, 0.0])
  np.testing.assert_array_equal(layer_dropout_rates(dataclasses.replace(mc, depth=8)), [0, 0, .5, .5, .5, .5, 0, 0])
  model = ELF(mc)
  params = nn.unbox(init_params(model, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  t, w = jnp.array([0.3, 0.7]), jnp.array([1.0, 2.0])

  def silence(layers):
    """Zero the attention and MLP output projections of `layers`: those blocks add nothing to the residual."""
    blocks = jax.tree.map(lambda v: v, params["blocks"])  # a copy of the nested dicts
    for branch, projection in (("attn", "proj"), ("mlp", "w3")):
      blocks[branch][projection] = jax.tree.map(lambda v: v.at[layers].set(0.0), blocks[branch][projection])
    return dict(params, blocks=blocks)

  def outputs(p):
    det = model.apply({"params": p}, x, t, w, decode=True)
    drop = model.apply({"params": p}, x, t, w, decode=True, deterministic=False, rngs={"dropout": jax.random.key(2)})
    return np.asarray(det), np.asarray(drop)

  det, drop = outputs(silence(np.array([1, 2])))
  np.testing.assert_array_equal(det, drop)
  det, drop = outputs(silence(np.array([0, 3])))
  assert np.abs(det - drop).max() > 1e-3
