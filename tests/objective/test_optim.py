"""Tests for elf_jax.objective.optim: parity of the learning-rate schedules and of three Muon / AdamW updates with
the reference optimizer (fixture `reference_elf_train`, made by running the authors' `get_optimizer` and
`create_learning_rate_fn`), then clipping, routing and EMA (gradient accumulation:
tests/integration/test_accumulation.py)."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elf_jax import config as config_lib
from elf_jax.model import elf
from elf_jax.objective import optim
from elf_jax.weights import published

from tests.conftest import fixture_config

NUM_UPDATES = 3  # the fixture's optim/grads_{0,1,2}


def _optim_config(**overrides):
  c = config_lib.base_config().optim
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def reference(train_fixture_dir):
  """(config.json, reference.npz arrays, checkpoint params) of the reference_elf_train fixture."""
  root = train_fixture_dir
  params = published.load_published_elf(root / "checkpoint.msgpack", which="raw")
  with np.load(root / "reference.npz") as arrays:
    return fixture_config(root), dict(arrays), jax.tree.map(jnp.asarray, params)


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def _reference_tree(arrays, prefix, like):
  """The tree `prefix/<published param path>` of the fixture, shaped (blocks stacked) like `like`."""
  published = elf.unstack_blocks(like)
  return elf.stack_blocks(
      jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(arrays[f"{prefix}/{_path(p)}"]), published))


def _assert_close(ours, ref, rtol, what) -> float:
  """Per leaf (published names: blocks unstacked) ‖ours − ref‖ / ‖ref‖ ≤ rtol (Frobenius), max |ours| ≤ 1e-7 where
  the reference leaf is all zeros; returns the largest relative error."""
  ours, ref = elf.unstack_blocks(ours), elf.unstack_blocks(ref)
  errors, bad = [0.0], {}
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(ours)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (_path(path), a.shape, b.shape)
    ref_norm = np.linalg.norm(b)
    if ref_norm == 0:
      if np.abs(a).max() > 1e-7:
        bad[_path(path)] = f"max |ours| {np.abs(a).max():.2e} where the reference is 0"
    else:
      errors.append(np.linalg.norm(a - b) / ref_norm)
      if errors[-1] > rtol:
        bad[_path(path)] = f"relative error {errors[-1]:.2e}"
  assert not bad, f"{what}: {bad}"
  return max(errors)


def _reference_schedule_config(args, kind, **overrides):
  """An optim config whose schedule is the reference's `create_learning_rate_fn(*args, kind)`, and the total steps.

  args: (num_train_steps, warm-up steps, peak lr) in optimizer updates. The peak lr is reached through our
  `base_lr * global_batch_size / 256` rule, with the default global batch.
  """
  total, warmup, peak = args
  c = _optim_config(schedule=kind, warmup_steps=int(warmup), **overrides)
  c.base_lr = float(peak) * 256 / c.global_batch_size
  return c, int(total)


def test_learning_rate_scales_linearly_with_batch():
  c = _optim_config(base_lr=1e-3)
  assert optim.learning_rate(c, 512) == pytest.approx(2e-3)
  assert optim.learning_rate(c, 64) == pytest.approx(2.5e-4)


@pytest.mark.parametrize("name", ["owt", "cond", "cosine"])
def test_schedule_equals_the_reference(reference, name):
  """Warm-up from 0 at update 0, then constant (`owt`, `cond`) or cosine to 0 (`cosine`), at the fixture's steps."""
  _, arrays, _ = reference
  c, total = _reference_schedule_config(arrays[f"lr/{name}/args"], "cosine" if name == "cosine" else "constant")
  schedule = optim.make_schedule(c, steps_per_epoch=1, total_steps=total)  # steps_per_epoch unused: warm-up given
  got = np.array([float(schedule(int(s))) for s in arrays[f"lr/{name}/steps"]])
  np.testing.assert_allclose(got, arrays[f"lr/{name}/values"], rtol=1e-6, atol=1e-12)


def test_warmup_length_rule():
  """`warmup_steps >= 0` is the warm-up length (0 = none); below 0, `int(warmup_epochs * steps per epoch)`."""
  c = _optim_config(warmup_steps=-1, warmup_epochs=0.5)
  assert optim.warmup_steps(c, steps_per_epoch=21) == 10  # truncated, as the reference's int()
  c = _optim_config(warmup_steps=0, warmup_epochs=0.5, base_lr=1e-3, global_batch_size=256)
  assert optim.warmup_steps(c, steps_per_epoch=21) == 0
  assert float(optim.make_schedule(c, steps_per_epoch=21, total_steps=100)(0)) == pytest.approx(1e-3)


def test_schedule_and_optimizer_reject_unknown_names():
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_optim_config(schedule="linear"), 10, 100)
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(_optim_config(optimizer="sgd"), 1e-3)


def test_muon_defaults_are_optax_defaults(reference):
  """The reference calls `optax.contrib.muon(learning_rate)`: our Muon settings are that function's defaults."""
  assert reference[0]["optim"]["muon"] == "optax.contrib.muon defaults"
  defaults = {k: p.default for k, p in inspect.signature(optax.contrib.muon).parameters.items()}
  c = config_lib.base_config().optim
  assert (c.muon_momentum, c.muon_adam_b1, c.muon_adam_b2) == (defaults["beta"], defaults["adam_b1"],
                                                               defaults["adam_b2"])
  assert c.weight_decay == defaults["weight_decay"] == defaults["adam_weight_decay"]
  assert defaults["nesterov"] is True and defaults["muon_weight_dimension_numbers"] is None


def test_muon_routing_on_the_reference_params(reference):
  """Every kernel (incl. proj_kernel, unembed_kernel) → Muon, as the reference's rule on its unstacked 2-D leaves:
  stacked (L, in, out) block kernels batched over L; the (1, 4, H) tokens, biases and norm weights (stacked: 2-D)
  → Adam."""
  params = reference[2]
  dims = optim.muon_dimension_numbers(params)
  is_leaf = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  routed = {_path(p): d for p, d in jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_leaf)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path(path)
    if name.startswith(f"{elf.BLOCKS}/"):
      want = optax.contrib.MuonDimensionNumbers(1, 2) if name.endswith("kernel") else None
    else:
      want = optax.contrib.MuonDimensionNumbers() if leaf.ndim == 2 else None
    assert routed[name] == want, (name, leaf.shape)
  for name in ("proj_kernel", "unembed_kernel"):
    assert routed[name] is not None
  for name in ("t_emb_tokens", "mode_tokens", "self_cond_cfg_tokens"):
    assert params[name].ndim == 3 and routed[name] is None


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_three_updates_equal_the_reference(reference, name):
  """Clip (`clip_gradient`) + Muon / AdamW, built from config as training builds them, from the checkpoint's params
  with the fixture's gradients: the params after each update equal the reference's per leaf (rel. Frobenius ≤ 1e-5)."""
  config, arrays, params = reference
  o = config["optim"]
  s = o["lr_schedule"]
  c, total = _reference_schedule_config((s["num_train_steps"], s["num_warmup_steps"], s["learning_rate"]), "constant",
                                        optimizer=name, grad_clip=o["clip"], adamw_b1=o["adamw"]["b1"],
                                        adamw_b2=o["adamw"]["b2"], weight_decay=o["adamw"]["weight_decay"])
  optimizer = optim.make_optimizer(c, optim.make_schedule(c, steps_per_epoch=1, total_steps=total))
  update = jax.jit(optimizer.update)
  state = optimizer.init(params)
  worst = worst_step = 0.0
  for k in range(NUM_UPDATES):
    before = params
    grads = optim.clip_gradient(_reference_tree(arrays, f"optim/grads_{k}", params), c)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want = _reference_tree(arrays, f"optim/{name}/params_{k + 1}", params)
    worst = max(worst, _assert_close(params, want, 1e-5, f"params after update {k + 1}"))
    # The params barely move per update, so also compare the change itself: ≤ 1e-4 (measured ≤ 1.4e-5, float32
    # cancellation in ref − before); a Muon b2 of 0.95 or momentum 0.9 is off by ≥ 2e-2, AdamW decay 1e-4 by 3e-4.
    worst_step = max(worst_step, _assert_close(jax.tree.map(jnp.subtract, params, before),
                                               jax.tree.map(jnp.subtract, want, before), 1e-4,
                                               f"param change of update {k + 1}"))
  print(f"{name}, max relative error over {NUM_UPDATES} updates: params {worst:.2e}, param changes {worst_step:.2e}")


def _tree(key):
  """A small parameter tree shaped like ELF's: a learned (1, 4, H) token tensor, a 2-D kernel and a bias."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {"tokens": jax.random.normal(k1, (1, 4, 8)),
          "dense": {"kernel": jax.random.normal(k2, (8, 16)), "bias": jax.random.normal(k3, (16,))}}


def _clip(tree, max_norm=1.0):
  return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / optax.tree.norm(tree)), tree)


def test_clip_gradient_scales_to_the_global_norm():
  """A gradient above `grad_clip` is scaled to that global norm, one below it is left alone; 0 disables; < 0 is an
  error."""
  params = _tree(jax.random.PRNGKey(0))
  big = jax.tree.map(lambda p: 1000.0 * jnp.cos(p), params)
  small = jax.tree.map(lambda p: 0.01 * jnp.sin(3 * p), params)
  c = _optim_config(grad_clip=1.0)
  clipped = optim.clip_gradient(big, c)
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(_clip(big))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(optim.clip_gradient(small, c)), jax.tree.leaves(small)):
    np.testing.assert_array_equal(a, b)
  assert optim.clip_gradient(big, _optim_config(grad_clip=0.0)) is big
  with pytest.raises(ValueError, match="grad_clip"):
    optim.clip_gradient(big, _optim_config(grad_clip=-1.0))


def test_muon_batched_over_the_layer_axis_equals_muon_per_block():
  """Stacked blocks (kernels (L, in, out), biases and norm weights (L, X)) get exactly the updates that the
  published per-block layout (2-D kernels, 1-D vectors) gets: Newton–Schulz runs per slice, vectors go to Adam."""
  depth, keys = 3, jax.random.split(jax.random.PRNGKey(4), 4)
  stacked = {"head": {"kernel": jax.random.normal(keys[0], (8, 5))},
             elf.BLOCKS: {"w": {"kernel": jax.random.normal(keys[1], (depth, 8, 16)),
                                "bias": jax.random.normal(keys[2], (depth, 16))},
                          "norm": {"weight": jax.random.normal(keys[3], (depth, 8))}}}
  # Block 1's kernel gradient is 100x the others': a normalisation over the whole stack would shrink their steps.
  scale = lambda p: 1 + 99 * (p.ndim == 3) * (jnp.arange(p.shape[0]) == 1).reshape((-1,) + (1,) * (p.ndim - 1))
  grads = [jax.tree.map(lambda p, i=i: jnp.cos((i + 2) * p) * scale(p), stacked) for i in range(2)]
  opt = optim.make_optimizer(_optim_config(optimizer="muon", grad_clip=0.0), 1e-2)

  def two_updates(params, grads):
    state, out = opt.init(params), []
    for g in grads:
      u, state = opt.update(g, state, params)
      out.append(u)
    return out

  got = two_updates(stacked, grads)
  want = two_updates(elf.unstack_blocks(stacked), [elf.unstack_blocks(g) for g in grads])
  for ours, per_block in zip(got, want):
    ours = elf.unstack_blocks(ours)
    assert jax.tree.structure(ours) == jax.tree.structure(per_block)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(per_block)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_muon_routes_matrices_to_muon_and_the_rest_to_adam():
  params = _tree(jax.random.PRNGKey(1))
  lr = 1e-2
  c = _optim_config(optimizer="muon", grad_clip=0.0)
  opt = optim.make_optimizer(c, lr)
  grads = jax.tree.map(lambda p: jnp.sin(2 * p) + 0.1, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  # Nesterov Adam's first (bias-corrected) step is -lr * (1 + b1 / (1 + b1)) * sign(g) elementwise.
  adam_step = lr * (1 + c.muon_adam_b1 / (1 + c.muon_adam_b1))
  np.testing.assert_allclose(np.abs(updates["tokens"]), adam_step, rtol=1e-4)
  np.testing.assert_allclose(np.abs(updates["dense"]["bias"]), adam_step, rtol=1e-4)
  # Muon's step is a near-orthogonal matrix: its singular values are all of one size, unlike -lr * sign(g).
  sv = np.linalg.svd(np.asarray(updates["dense"]["kernel"]), compute_uv=False)
  assert sv.max() / sv.min() < 2.0
  sign_sv = np.linalg.svd(np.sign(np.asarray(grads["dense"]["kernel"])), compute_uv=False)
  assert sign_sv.max() / sign_sv.min() > 2.0  # the check above could tell Adam's step apart


def test_muon_reduces_a_quadratic_loss():
  params = _tree(jax.random.PRNGKey(2))
  target = jax.tree.map(lambda p, n: p + 0.5 * n, params, _tree(jax.random.PRNGKey(3)))
  c = _optim_config(optimizer="muon", grad_clip=1.0, warmup_steps=5, base_lr=0.05, global_batch_size=256,
                    schedule="cosine")
  opt = optim.make_optimizer(c, optim.make_schedule(c, steps_per_epoch=10, total_steps=60))

  def loss_fn(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  @jax.jit
  def step(p, s):
    g = optim.clip_gradient(jax.grad(loss_fn)(p), c)
    u, s = opt.update(g, s, p)
    return jax.tree.map(lambda a, b: a + b, p, u), s

  state = opt.init(params)
  start = float(loss_fn(params))
  for _ in range(60):
    params, state = step(params, state)
  assert float(loss_fn(params)) < 0.1 * start


def test_ema_update():
  """ema ← decay·ema + (1 − decay)·params, in float32 whatever the params' dtype (accumulation:
  tests/integration/test_accumulation.py)."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(jax.random.PRNGKey(5)))
  ema = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
  decay = 0.9
  new_ema = optim.ema_update(ema, params, decay)
  for e_new, e_old, p in zip(jax.tree.leaves(new_ema), jax.tree.leaves(ema), jax.tree.leaves(params)):
    assert e_new.dtype == jnp.float32
    np.testing.assert_allclose(e_new, decay * e_old + (1 - decay) * np.asarray(p, np.float32), rtol=1e-6)
