"""Tests for elf_jax.train.optim: learning rate, schedules, clipping, Muon routing, accumulation, EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax import config as config_lib
from elf_jax.train import optim


def _optim_config(**overrides):
  c = config_lib.base_config().optim
  c.update(overrides)
  return c


def _tree(key):
  """A small parameter tree shaped like ELF's: a learned (1, 4, H) token tensor, a 2-D kernel and a bias."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {"tokens": jax.random.normal(k1, (1, 4, 8)),
          "dense": {"kernel": jax.random.normal(k2, (8, 16)), "bias": jax.random.normal(k3, (16,))}}


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_learning_rate_scales_linearly_with_batch():
  c = _optim_config(base_lr=1e-3)
  assert optim.learning_rate(c, 512) == pytest.approx(2e-3)
  assert optim.learning_rate(c, 64) == pytest.approx(2.5e-4)


def test_warmup_then_constant():
  c = _optim_config(base_lr=1e-3, global_batch_size=256, warmup_steps=0, warmup_epochs=0.5, schedule="constant")
  sched = optim.make_schedule(c, steps_per_epoch=20, total_steps=100)  # warm-up = 0.5 * 20 = 10 steps
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 50, 100)], [0.0, 5e-4, 1e-3, 1e-3, 1e-3],
                             rtol=1e-6, atol=1e-12)


def test_warmup_steps_override_then_cosine():
  c = _optim_config(base_lr=1e-3, global_batch_size=512, warmup_steps=4, warmup_epochs=3.0, schedule="cosine")
  sched = optim.make_schedule(c, steps_per_epoch=1000, total_steps=104)  # warm-up 4, cosine over 100
  peak = 2e-3
  expected = [0.0, peak / 2, peak, peak * 0.5 * (1 + np.cos(np.pi * 0.25)), peak / 2, 0.0]
  got = [float(sched(s)) for s in (0, 2, 4, 29, 54, 104)]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_schedule_and_optimizer_reject_unknown_names():
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_optim_config(schedule="linear"), 10, 100)
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(_optim_config(optimizer="sgd"), 1e-3)


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_clipping_equals_prescaling_the_gradient(name):
  """Clip to norm 1 of a huge gradient == feeding the unit-norm gradient to the unclipped optimizer."""
  params = _tree(jax.random.PRNGKey(0))
  g1 = jax.tree.map(lambda p: 1000.0 * jnp.cos(p), params)
  g2 = jax.tree.map(lambda p: 0.01 * jnp.sin(3 * p), params)  # global norm < 1: left alone by the clip
  norm1 = _global_norm(g1)
  clipped = optim.make_optimizer(_optim_config(optimizer=name, grad_clip=1.0), 1e-2)
  plain = optim.make_optimizer(_optim_config(optimizer=name, grad_clip=0.0), 1e-2)

  def two_updates(opt, grads):
    state = opt.init(params)
    out = []
    for g in grads:
      u, state = opt.update(g, state, params)
      out.append(u)
    return out

  got = two_updates(clipped, [g1, g2])
  want = two_updates(plain, [jax.tree.map(lambda g: g / norm1, g1), g2])
  unclipped = two_updates(plain, [g1, g2])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # The clip matters: without it the second update differs (Adam's moments remember the huge gradient).
  assert not np.allclose(jax.tree.leaves(got[1])[0], jax.tree.leaves(unclipped[1])[0], rtol=1e-3)


def test_muon_routes_matrices_to_muon_and_the_rest_to_adam():
  params = _tree(jax.random.PRNGKey(1))
  dims = optim.muon_dimension_numbers(params)
  assert dims["tokens"] is None and dims["dense"]["bias"] is None and dims["dense"]["kernel"] is not None
  lr = 1e-2
  c = _optim_config(optimizer="muon", grad_clip=0.0)
  opt = optim.make_optimizer(c, lr)
  grads = jax.tree.map(lambda p: jnp.sin(2 * p) + 0.1, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  # Nesterov Adam's first (bias-corrected) step is -lr * (1 + b1 / (1 + b1)) * sign(g) elementwise.
  adam_step = lr * (1 + c.b1 / (1 + c.b1))
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
    g = jax.grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return jax.tree.map(lambda a, b: a + b, p, u), s

  state = opt.init(params)
  start = float(loss_fn(params))
  for _ in range(60):
    params, state = step(params, state)
  assert float(loss_fn(params)) < 0.1 * start


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_accumulation_equals_one_step_on_the_mean_gradient(name):
  params = _tree(jax.random.PRNGKey(4))
  g1 = jax.tree.map(lambda p: jnp.cos(p), params)
  g2 = jax.tree.map(lambda p: jnp.sin(5 * p) * 3.0, params)
  c_acc = _optim_config(optimizer=name, grad_accum_steps=2, grad_clip=1.0)
  c_one = _optim_config(optimizer=name, grad_accum_steps=1, grad_clip=1.0)
  acc = optim.make_optimizer(c_acc, 1e-2)
  one = optim.make_optimizer(c_one, 1e-2)

  state = acc.init(params)
  u1, state = acc.update(g1, state, params)
  assert not bool(optim.is_update_step(state, c_acc))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))
  u2, state = acc.update(g2, state, params)
  assert bool(optim.is_update_step(state, c_acc))
  want, one_state = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(params), params)
  assert bool(optim.is_update_step(one_state, c_one))
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_ema_moves_only_on_update_steps():
  c = _optim_config(optimizer="adamw", grad_accum_steps=2)
  opt = optim.make_optimizer(c, 0.1)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(jax.random.PRNGKey(5)))
  ema = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  state = opt.init(params)
  decay = 0.9
  for micro in range(4):
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, state = opt.update(grads, state, params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
    applied = optim.is_update_step(state, c)
    assert bool(applied) == (micro % 2 == 1)
    new_ema = optim.ema_update(ema, params, decay, applied)
    for e_new, e_old, p in zip(jax.tree.leaves(new_ema), jax.tree.leaves(ema), jax.tree.leaves(params)):
      assert e_new.dtype == jnp.float32
      want = decay * e_old + (1 - decay) * np.asarray(p, np.float32) if bool(applied) else e_old
      np.testing.assert_allclose(e_new, want, rtol=1e-6)
      if bool(applied):
        assert not np.allclose(e_new, e_old)
    ema = new_ema
