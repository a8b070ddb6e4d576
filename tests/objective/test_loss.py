"""The training objective: flow math by hand, the guided target, stop-gradients, self-conditioning draws, branch
skipping, what each network pass sees (clean conditions, no padding mask); and parity with the reference train step
itself (below)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig, init_params, unstack_blocks
from elf_jax.objective import flow
from elf_jax.objective import loss as L
from elf_jax.weights import published

from tests.conftest import fixture_config

C = 8


def test_path_velocity_and_guided_target_by_hand():
  x0, eps = jnp.full((2, 1, 1), 2.0), jnp.full((2, 1, 1), 0.5)
  t = jnp.array([0.25, 0.98])
  z = flow.interpolate(x0, eps, t, sigma=2.0)  # t·2 + (1 − t)·2·0.5
  np.testing.assert_allclose(z.ravel(), [1.25, 1.98], rtol=1e-6)
  v = flow.velocity(x0, z, t, t_eps=0.05)  # (2 − z) / max(1 − t, 0.05)
  np.testing.assert_allclose(v.ravel(), [0.75 / 0.75, 0.02 / 0.05], rtol=1e-5)
  g = flow.guided_target(jnp.ones((2, 1, 1)), jnp.full((2, 1, 1), 3.0), jnp.ones((2, 1, 1)), jnp.array([2.0, 1.0]))
  np.testing.assert_allclose(g.ravel(), [1 + 0.5 * 2, 1.0], rtol=1e-6)  # w = 1: no guidance


def test_guidance_scale_and_time_distributions():
  w = flow.sample_guidance_scale(jax.random.key(0), (20000,), 0.5, 5.0)
  assert 0.5 <= float(w.min()) and float(w.max()) <= 5.0
  np.testing.assert_allclose(float(jnp.median(jnp.log1p(w))), 0.5 * (np.log(1.5) + np.log(6.0)), atol=0.02)
  t = flow.sample_time(jax.random.key(1), (20000,), "logit_normal", -1.5, 0.8)
  np.testing.assert_allclose(float(jnp.median(t)), 1 / (1 + np.exp(1.5)), atol=0.01)
  grid = flow.time_grid(8, "logit_normal", jax.random.key(2), -1.5, 0.8)
  assert grid.shape == (9,) and grid[0] == 0 and grid[-1] == 1 and bool(jnp.all(jnp.diff(grid) >= 0))
  with pytest.raises(ValueError, match="rng"):
    flow.time_grid(8, "logit_normal")


def test_self_conditioning_draws():
  bern = jnp.stack([flow.sample_self_cond(jax.random.key(i), 12, 12, 0.5, "bernoulli") for i in range(400)])
  np.testing.assert_allclose(bern.mean(0), 0.5, atol=0.1)  # one coin per example: groups of one included
  assert len(set(np.asarray(bern.sum(-1)).tolist())) > 3  # the count varies from draw to draw
  fixed = jnp.stack([flow.sample_self_cond(jax.random.key(i), 12, 3, 0.5, "fixed_count") for i in range(400)])
  np.testing.assert_array_equal(fixed.reshape(400, 3, 4).sum(-1), 2)  # exactly 2 of each group of 4
  np.testing.assert_allclose(fixed.mean(0), 0.5, atol=0.1)  # every position equally likely
  assert flow.num_self_conditioned(5, 0.5) in (2, 3) and flow.num_self_conditioned(8, 0.0) == 0
  for draw in ("bernoulli", "fixed_count"):
    assert not bool(flow.sample_self_cond(jax.random.key(0), 8, 2, 0.0, draw).any())
    assert bool(flow.sample_self_cond(jax.random.key(0), 8, 2, 1.0, draw).all())
  with pytest.raises(ValueError, match="self_cond_draw"):
    flow.sample_self_cond(jax.random.key(0), 8, 2, 0.5, "half")


def _small_model_config() -> ModelConfig:
  return ModelConfig.from_config(base_config(), latent_dim=C, hidden_size=32, depth=2, num_heads=4, bottleneck_dim=8,
                                 vocab_size=11)


def _model_and_params(seed=0):
  model = ELF(_small_model_config())
  params = nn.unbox(init_params(model, jax.random.key(seed)))
  # Perturb every leaf so the zero-initialised final layer carries signal.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params


def _batch(b=4, s=6, cond_len=0, seed=3):
  valid = jnp.ones((b, s), bool).at[0, -2:].set(False)
  cond = jnp.zeros((b, s), bool).at[:, :cond_len].set(True)
  return dict(x0=jax.random.normal(jax.random.key(seed), (b, s, C)),
              ids=jax.random.randint(jax.random.key(seed + 1), (b, s), 0, 11),
              valid=valid, cond_mask=cond, loss_mask=valid & ~cond)


@pytest.mark.parametrize("draw,prob,self_cond", [
    ("bernoulli", 0.5, [True, False, False, False]), ("bernoulli", 0.5, [False] * 4),
    ("bernoulli", 0.5, [True] * 4), ("fixed_count", 0.5, [False, True, False, True]),
    ("fixed_count", 0.0, [False] * 4), ("fixed_count", 1.0, [True] * 4)])
@pytest.mark.slow
def test_denoiser_loss_and_gradients_match_independent_computation(draw, prob, self_cond):
  """Loss value and gradient equal the reference's plain computation: separate full-batch passes for the
  self-conditioning input, v_uncond and v_cond (whose input restores the clean condition into x̂_uncond on every
  row), no padding mask, the guidance term kept on self-conditioned rows only."""
  model, params = _model_and_params()
  batch = _batch(cond_len=2)
  fc = flow.FlowConfig.from_config(base_config(), self_cond_prob=prob, self_cond_draw=draw)
  noise = L.draw_noise(jax.random.key(7), 4, 6, C, fc, 1)
  noise["self_cond"] = jnp.array(self_cond)

  t, w, x0 = noise["t"], noise["w"], batch["x0"]
  cond = batch["cond_mask"][..., None]
  clean = lambda x: np.where(cond, x0, x)
  z = clean(flow.interpolate(x0, noise["eps"], t, fc.denoiser_noise_scale))
  run = lambda p, x_sc: model.apply({"params": p}, jnp.concatenate([z, x_sc], -1), t, w)
  vel = lambda x: flow.velocity(x, z, t, fc.t_eps)
  use_sc = noise["self_cond"][:, None, None]
  x_a = np.asarray(run(params, clean(np.zeros_like(z))))  # first self-conditioning pass == v_uncond pass
  x_sc = clean(np.where(use_sc, x_a, 0.0))
  x_b = np.asarray(run(params, clean(x_a)))  # v_cond pass
  w_ = np.asarray(w)[:, None, None]
  target = np.asarray(np.where(use_sc, vel(x0) + (1 - 1 / w_) * (vel(x_b) - vel(x_a)), vel(x0)))

  def reference(p):
    err = jnp.mean(jnp.square(vel(run(p, x_sc)) - target), -1)
    m = batch["loss_mask"]
    return jnp.sum(err * m) / jnp.sum(m)

  ours = lambda p: L.denoiser_loss(model, p, batch, noise, fc, jax.random.key(0))
  np.testing.assert_allclose(ours(params), reference(params), rtol=1e-5)
  g_ours, g_ref = jax.grad(ours)(params), jax.grad(reference)(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class SpyELF(ELF):
  """ELF that reports (decode flag, network input, whether a padding mask was given) of every evaluation that runs."""

  def __call__(self, x, t, w, mask=None, *, decode=False, deterministic=True):
    jax.debug.callback(lambda xx: CALLS.append((decode, np.asarray(xx), mask is not None)), x)
    return super().__call__(x, t, w, mask, decode=decode, deterministic=deterministic)


CALLS = []


@pytest.mark.parametrize("coins,draw", [((True, True), "bernoulli"), ((False, True), "bernoulli"),
                                        ((False, False), "bernoulli"), ((False, True), "fixed_count")])
def test_passes_per_branch_and_what_they_see(coins, draw):
  _, params = _model_and_params()
  spy = SpyELF(_small_model_config())
  batch = _batch(b=4, cond_len=2)
  fc = flow.FlowConfig.from_config(base_config(), self_cond_draw=draw)
  noise = L.draw_noise(jax.random.key(0), 4, 6, C, fc, num_groups=2)
  noise["group_decode"] = jnp.array(coins)
  CALLS.clear()
  jax.block_until_ready(jax.jit(lambda p: L.grouped_loss(spy, p, batch, noise, fc))(params))
  jax.effects_barrier()
  n_dec = sum(coins)
  assert sorted(d for d, _, _ in CALLS) == [False] * (2 * (2 - n_dec)) + [True] * n_dec
  assert not any(masked for _, _, masked in CALLS)  # no key-padding mask, as the reference trains
  # A denoising group of 2 runs its x_sc = 0 pass on the whole group (bernoulli) or on its one self-conditioned
  # example (fixed_count), then the main pass on the whole group.
  first = 2 if draw == "bernoulli" else 1
  assert sorted(len(x) for d, x, _ in CALLS if not d) == sorted([first, 2] * (2 - n_dec))
  clean = np.asarray(batch["x0"][:, :2])
  for decode, x, _ in CALLS:
    for row in x:
      if decode:  # every position noised, the condition's too; an all-zero self-conditioning half
        assert not any(np.array_equal(row[:2, :C], c) for c in clean)
        assert not row[:, C:].any()
      else:  # both halves hold the clean condition latent at condition positions
        assert any(np.array_equal(row[:2, :C], c) and np.array_equal(row[:2, C:], c) for c in clean)


@pytest.mark.slow
def test_grouped_loss_metrics_and_group_coins():
  """The single-shard path of the train step's loss: draws → grouped_loss → summarize."""
  model, params = _model_and_params()
  batch = _batch(b=8)
  fc = flow.FlowConfig.from_config(base_config(), decoder_prob=0.5)
  noise = L.draw_noise(jax.random.key(1), 8, 6, C, fc, 4)
  (loss, m), grads = jax.jit(jax.value_and_grad(
      lambda p: L.summarize(L.grouped_loss(model, p, batch, noise, fc), 4), has_aux=True))(params)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  frac = float(m["decode_fraction"])
  expected = (1 - frac) * (0 if np.isnan(m["denoise_loss"]) else m["denoise_loss"]) + frac * (
      0 if np.isnan(m["decode_loss"]) else m["decode_loss"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  coins = [float(L.draw_noise(jax.random.key(i), 8, 6, C, fc, 4)["group_decode"].mean()) for i in range(200)]
  np.testing.assert_allclose(np.mean(coins), 0.5, atol=0.05)


# --------------------------------------------------------------------------------------------------------------
# The training objective equals the reference train step: given its batch and its random draws, the per-group
# loss reproduces the reference's loss and every gradient, for both branches of both batch recipes (fixture
# `reference_elf_train`, made by running the authors' own train step).

CASES = ("uncond_pad", "cond_eos")
BRANCHES = ("denoiser", "decoder")


@pytest.fixture(scope="module")
def reference(train_fixture_dir):
  """(config, arrays, model, params) of the reference_elf_train fixture."""
  root = train_fixture_dir
  config = fixture_config(root)
  params = published.load_published_elf(root / "checkpoint.msgpack", which="raw")
  model = ELF(ModelConfig.from_params(params))
  d = config["dims"]
  mc = model.config
  assert (mc.latent_dim, mc.hidden_size, mc.depth, mc.num_heads, mc.vocab_size, mc.bottleneck_dim) == (
      d["C"], d["H"], d["depth"], d["heads"], d["V"], d["BN"])
  with np.load(root / "reference.npz") as arrays:
    return config, dict(arrays), model, jax.tree.map(jnp.asarray, params)


def _flow_config(config, case) -> flow.FlowConfig:
  f, recipe = config["flow"], config["cases"][case]
  return flow.FlowConfig.from_config(
      base_config(), denoiser_noise_scale=f["denoiser_noise_scale"], P_mean=f["denoiser_p_mean"],
      P_std=f["denoiser_p_std"], t_eps=f["t_eps"], self_cond_prob=f["self_cond_prob"],
      guidance_min=f["guidance_min"], guidance_max=f["guidance_max"],
      decoder_noise_scale=recipe["decoder_noise_scale"], decoder_m_mean=f["decoder_p_mean"],
      decoder_m_std=f["decoder_p_std"], label_drop_prob=recipe["label_drop_prob"])


def _batch_and_draws(config, arrays, case, branch, fc):
  """The reference batch (loss mask by its recipe) and draws, injected into `draw_noise`'s layout."""
  a = lambda name: jnp.asarray(arrays[f"{case}/{name}"])
  x0 = a("draws/x0")
  cond = a("cond_seq_mask") > 0
  valid = a("attention_mask") > 0
  counted = valid if config["cases"][case]["pad_token"] == "pad" else jnp.ones_like(valid)
  batch = dict(x0=x0, ids=a("input_ids").astype(jnp.int32), valid=valid, cond_mask=cond, loss_mask=counted & ~cond)
  b, s, c = x0.shape
  noise = L.draw_noise(jax.random.key(0), b, s, c, fc, num_groups=1, conditional=fc.label_drop_prob > 0)
  given = dict(eps=a("draws/noise"), t=a("draws/t"), w=a("draws/w"), self_cond=a("draws/use_self_cond") > 0,
               decoder_lambda=a("draws/decoder_lambda"), decoder_noise=a("draws/decoder_noise"),
               drop_condition=a("label_drop_mask") > 0, group_decode=jnp.array([branch == "decoder"]))
  for name, value in given.items():
    assert noise[name].shape == value.shape and noise[name].dtype == value.dtype, name
  return batch, dict(noise, **given)


def _rel(ours, ref):
  ref_norm = np.linalg.norm(ref)
  if ref_norm == 0:
    return float(np.max(np.abs(ours), initial=0.0)), True
  return float(np.linalg.norm(ours - ref) / ref_norm), False


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_the_reference_train_step(reference, case, branch):
  config, arrays, model, params = reference
  fc = _flow_config(config, case)
  batch, noise = _batch_and_draws(config, arrays, case, branch, fc)
  loss_and_grad = jax.jit(jax.value_and_grad(lambda p: L.grouped_loss(model, p, batch, noise, fc)[0]))
  loss, grads = loss_and_grad(params)

  ref_loss = float(arrays[f"{case}/{branch}/loss"])
  assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (float(loss), ref_loss)
  prefix = f"{case}/{branch}/grads/"
  ours = {"/".join(k.key for k in path): np.asarray(g)  # by published name: the stacked block gradients unstacked
          for path, g in jax.tree_util.tree_leaves_with_path(unstack_blocks(grads))}
  assert set(ours) == {k[len(prefix):] for k in arrays if k.startswith(prefix)}
  worst = {True: 0.0, False: 0.0}  # zero reference leaf: max |ours|; else relative Frobenius error
  for name, g in ours.items():
    err, zero_ref = _rel(g, arrays[prefix + name])
    worst[zero_ref] = max(worst[zero_ref], err)
    assert err <= (1e-7 if zero_ref else 1e-5), (name, err, "max |ours|" if zero_ref else "relative Frobenius")
  print(f"{case}/{branch}: loss rel {abs(float(loss) - ref_loss) / abs(ref_loss):.2e}, max grad rel "
        f"{worst[False]:.2e}, max |grad| on zero leaves {worst[True]:.2e}")
