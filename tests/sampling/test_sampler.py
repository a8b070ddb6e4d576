"""The sampler: parity with the reference sampler's outputs (ODE and CFG on the tiny fixture, SDE with the
logit-normal grid on the training fixture), SDE/ODE/grid invariants, EOS masking and the conditional output length,
network-call counts, sharded == unsharded, presets, and the trajectory view."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers

from elf_jax.config import (
  SAMPLE_PRESETS,
  ConfigError,
  base_config,
  few_step_settings,
  resolve,
  sample_settings,
  validate,
)
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.objective import flow
from elf_jax.sampling import sampler as S
from elf_jax.sampling import trajectory
from elf_jax.weights import published

from tests.conftest import CONFIGS, config_from_command_line, fixture_config, relative_error, tiny_fixture_model


@pytest.fixture(scope="module")
def ref(tiny_fixture_dir):
  """(model, EMA params, fixture config, reference arrays)."""
  cfg = fixture_config(tiny_fixture_dir)
  model = tiny_fixture_model(tiny_fixture_dir)
  params = published.load_published_elf(tiny_fixture_dir / "checkpoint_7", which="ema")
  return model, params, cfg, dict(np.load(tiny_fixture_dir / "reference.npz"))


@pytest.fixture(scope="module")
def sde_ref(train_fixture_dir):
  """The training fixture's SDE run: (model, params, config.json, the `sde/...` arrays without the prefix)."""
  directory = train_fixture_dir
  cfg = fixture_config(directory)
  dims, tokens = cfg["dims"], cfg["tokens"]
  model = ELF(ModelConfig.from_config(
      base_config(), latent_dim=dims["C"], hidden_size=dims["H"], depth=dims["depth"], num_heads=dims["heads"],
      bottleneck_dim=dims["BN"], vocab_size=dims["V"], num_time_tokens=tokens["num_time_tokens"],
      num_guidance_tokens=tokens["num_guidance_tokens"],
      num_mode_tokens=tokens["num_mode_tokens"]))
  expected = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0), dims["S"])))
  # The fixture's ema_params1 equals its params; sampling reads the EMA copy.
  params = published.load_published_elf(directory / "checkpoint.msgpack", which="ema", expected=expected)
  with np.load(directory / "reference.npz") as npz:
    arrays = {k.removeprefix("sde/"): npz[k] for k in npz.files if k.startswith("sde/")}
  return model, params, cfg, arrays


def _sde_config(cfg, **overrides):
  sde, f = cfg["sde"], cfg["flow"]
  fields = dict(method="sde", steps=sde["steps"], grid=sde["grid"], grid_p_mean=sde["p_mean"],
                grid_p_std=sde["p_std"], gamma=sde["gamma"], guidance_scale=sde["guidance_scale"], cfg_scale=1.0,
                noise_scale=f["denoiser_noise_scale"], t_eps=f["t_eps"], eos_id=cfg["eos_id"], pad_id=cfg["pad_id"])
  return S.SampleConfig.from_config(base_config(), **{**fields, **overrides})


# The reference samples with T5's EOS / pad ids (the word tokenizer of these tests has the same).
T5_IDS = dict(eos_id=1, pad_id=0)


def _config(cfg, task, **overrides):
  run = cfg[task]
  fields = dict(method=run["method"], steps=run["steps"], grid=run["grid"], guidance_scale=run["self_cond_cfg_scale"],
                cfg_scale=run["cfg_scale"], noise_scale=cfg["denoiser_noise_scale"], t_eps=cfg["t_eps"], **T5_IDS)
  return S.SampleConfig.from_config(base_config(), **{**fields, **overrides})


def _condition(cfg, r):
  b, s = r["z0"].shape[:2]
  cond_mask = np.broadcast_to(np.arange(s) < cfg["cond"]["cond_len"], (b, s))
  np.testing.assert_array_equal(cond_mask, r["cond_mask"] > 0)
  return r["cond_seq"], cond_mask


def _eos_mask_by_hand(ids, eos, pad):
  out = np.array(ids)
  for row in out:
    hits = np.flatnonzero(row == eos)
    if hits.size:
      row[hits[0]:] = pad
  return out


def test_unconditional_parity_with_reference(ref):
  model, params, cfg, r = ref
  config = _config(cfg, "unc")
  np.testing.assert_allclose(r["grid"], flow.time_grid(config.steps, config.grid), atol=1e-7)
  out = S.make_sampler(model, config)(params, S.SampleInputs(r["z0"], r["grid"]))
  np.testing.assert_allclose(out.latents, r["z_unc"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.raw_ids, r["ids_unc"])
  np.testing.assert_array_equal(out.ids, _eos_mask_by_hand(r["ids_unc"], config.eos_id, config.pad_id))


def test_conditional_cfg_parity_with_reference(ref):
  """CFG s = 2, w = 1: one batched call per step; the condition prefix is held clean and stripped from `ids`."""
  model, params, cfg, r = ref
  config = _config(cfg, "cond")
  assert config.cfg_scale != 1.0
  cond_seq, cond_mask = _condition(cfg, r)
  out = S.make_sampler(model, config)(params, S.SampleInputs(
      r["z0"], r["grid"], condition=S.PinnedLatents(cond_seq, cond_mask)))
  np.testing.assert_allclose(out.latents, r["z_cond"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out.latents[:, :cfg["cond"]["cond_len"]], cond_seq[:, :cfg["cond"]["cond_len"]])
  np.testing.assert_array_equal(out.raw_ids, r["ids_cond"])
  n = cfg["cond"]["cond_len"]
  targets = np.concatenate([r["ids_cond"][:, n:], np.full((r["z0"].shape[0], n), config.pad_id)], 1)
  np.testing.assert_array_equal(out.ids, _eos_mask_by_hand(targets, config.eos_id, config.pad_id))


def test_known_prefix_positions_are_held_under_unconditional_settings(ref):
  """A prefix to continue (ragged per example, no CFG, the unconditional settings): its clean latents stay at their
  positions at every step of the trajectory and at the end, the rest moves as in a free run, and the output holds
  the continuation only (left-aligned)."""
  model, params, cfg, r = ref
  config = _config(cfg, "unc", return_trajectory=True)
  lengths = np.array([1, 4, 7])
  known = np.arange(r["z0"].shape[1])[None, :] < lengths[:, None]
  out = S.make_sampler(model, config)(params, S.SampleInputs(r["z0"], r["grid"],
                                                             condition=S.PinnedLatents(r["cond_seq"], known)))
  held = np.broadcast_to(known[None, ..., None], out.trajectory.shape)
  np.testing.assert_array_equal(np.asarray(out.trajectory)[held], np.broadcast_to(r["cond_seq"], held.shape)[held])
  np.testing.assert_array_equal(np.asarray(out.latents)[known], r["cond_seq"][known])
  free = S.make_sampler(model, config)(params, S.SampleInputs(r["z0"], r["grid"]))
  assert np.abs(np.asarray(out.latents) - np.asarray(free.latents))[~known].max() > 1e-3  # the prefix steers the rest
  for row, n in enumerate(lengths):
    continuation = np.asarray(out.raw_ids[row, n:])
    want = _eos_mask_by_hand(np.concatenate([continuation, np.full(n, config.pad_id)])[None], config.eos_id,
                             config.pad_id)[0]
    np.testing.assert_array_equal(out.ids[row], want)


def test_sde_parity_with_reference(sde_ref):
  """Unconditional SDE from the reference's z0, logit-normal grid and churn noise: its z_final and tokens."""
  model, params, cfg, r = sde_ref
  config = _sde_config(cfg)
  b = r["z0"].shape[0]
  assert r["grid"].shape == (config.steps + 1,) and r["churn_noise"].shape == (config.steps - 1,) + r["z0"].shape
  out = S.make_sampler(model, config)(params, S.SampleInputs(r["z0"], r["grid"], churn_noise=r["churn_noise"]))
  error = relative_error(out.latents, r["z_final"])
  print(f"SDE z_final: relative error {error:.2e}, max abs {np.abs(out.latents - r['z_final']).max():.2e}")
  assert error <= 1e-5
  np.testing.assert_array_equal(out.ids, r["ids"])
  assert out.ids.shape == (b, cfg["dims"]["S"])


def test_logit_normal_grid_from_reference_logits(sde_ref):
  """The reference grid is (0, sorted sigmoid(logits), 1); time_grid builds it from p_mean + p_std · N(0, 1)."""
  _, _, cfg, r = sde_ref
  config = _sde_config(cfg)
  assert config.grid == "logit_normal" and r["grid_logits"].shape == (config.steps - 1,)
  np.testing.assert_allclose(flow.logit_normal_grid(r["grid_logits"]), r["grid"], rtol=1e-6, atol=0)
  key = jax.random.key(cfg["seed"])
  draws = config.grid_p_mean + config.grid_p_std * jax.random.normal(key, (config.steps - 1,))
  np.testing.assert_array_equal(flow.time_grid(config.steps, config.grid, key, config.grid_p_mean, config.grid_p_std),
                                flow.logit_normal_grid(draws))


def test_injected_churn_noise_equals_the_drawn_one(sde_ref):
  """Default path: step i draws σ·N(0, I) from fold_in(rng, i); passing that noise in gives the same run."""
  model, params, cfg, r = sde_ref
  config = _sde_config(cfg)
  rng = jax.random.key(cfg["seed"])
  noise = jnp.stack([config.noise_scale * jax.random.normal(jax.random.fold_in(rng, i), r["z0"].shape)
                     for i in range(config.steps - 1)])
  run = S.make_sampler(model, config)
  drawn = run(params, S.SampleInputs(r["z0"], r["grid"], rng=rng))
  injected = run(params, S.SampleInputs(r["z0"], r["grid"], churn_noise=noise))
  # Equal up to float rounding (the noise is scaled inside the program in one run, outside in the other).
  np.testing.assert_allclose(drawn.latents, injected.latents, rtol=0, atol=1e-5)
  assert np.abs(drawn.latents - r["z_final"]).max() > 1e-2  # another noise, another sample
  with pytest.raises(ValueError, match="steps − 1"):
    run(params, S.SampleInputs(r["z0"], r["grid"], churn_noise=r["churn_noise"][1:]))


def test_sde_churn(ref):
  """γ = 0 is the ODE; γ > 0 depends on the key; a single (= last) interval is always an ODE step."""
  model, params, cfg, r = ref
  config = _config(cfg, "unc", method="ode", gamma=0.0)
  ode_run = S.make_sampler(model, config)
  sde_runs = {g: S.make_sampler(model, dataclasses.replace(config, method="sde", gamma=g)) for g in (0.0, 1.5)}
  ode = lambda grid: ode_run(params, S.SampleInputs(r["z0"], grid)).latents
  sde = lambda grid, gamma, key: sde_runs[gamma](params, S.SampleInputs(r["z0"], grid, rng=jax.random.key(key))).latents
  grid = r["grid"]
  np.testing.assert_allclose(sde(grid, 0.0, 0), ode(grid), atol=1e-5)
  a, b = sde(grid, 1.5, 0), sde(grid, 1.5, 1)
  assert np.abs(a - b).max() > 1e-2 and np.abs(a - ode(grid)).max() > 1e-2
  np.testing.assert_array_equal(a, sde(grid, 1.5, 0))
  one = np.array([0.0, 1.0], np.float32)
  np.testing.assert_allclose(sde(one, 1.5, 0), ode(one), atol=1e-5)  # churn would replace z by noise here


def test_per_example_grid_equals_separate_runs(ref):
  model, params, cfg, r = ref
  config = _config(cfg, "unc", grid="logit_normal", method="sde", gamma=1.0)
  grids = flow.time_grid(config.steps, "logit_normal", jax.random.key(3), config.grid_p_mean, config.grid_p_std,
                         batch=r["z0"].shape[0])
  z0, w = r["z0"], np.array([1.0, 2.0, 3.0], np.float32)
  rng = jax.random.key(5)
  run = S.make_sampler(model, config)
  batched = run(params, S.SampleInputs(z0, grids, guidance_scale=w, rng=rng))
  for i in range(z0.shape[0]):
    # The SDE noise is drawn for the whole batch: replay it by running the batch with row i's grid everywhere.
    single = run(params, S.SampleInputs(z0, grids[i], guidance_scale=w, rng=rng))
    np.testing.assert_allclose(batched.latents[i], single.latents[i], atol=1e-5)


def test_finalize_ids_by_hand():
  raw = jnp.array([[7, 1, 5, 1, 6], [9, 8, 4, 1, 3], [2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(S.mask_after_eos(raw, eos_id=1, pad_id=0),
                                [[7, 0, 0, 0, 0], [9, 8, 4, 0, 0], [2, 3, 4, 5, 6]])
  cond = jnp.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  # Condition stripped first (its EOS does not end the target), targets left-aligned, padding → pad.
  np.testing.assert_array_equal(S.finalize_ids(raw, cond, valid, eos_id=1, pad_id=0),
                                [[5, 0, 0, 0, 0], [4, 0, 0, 0, 0], [2, 3, 4, 0, 0]])
  np.testing.assert_array_equal(S.finalize_ids(raw, eos_id=4, pad_id=-1), [[7, 1, 5, 1, 6], [9, 8, -1, -1, -1],
                                                                          [2, 3, -1, -1, -1]])
  # Conditional outputs keep max_target_length tokens after the condition is stripped.
  np.testing.assert_array_equal(S.finalize_ids(raw, cond, eos_id=9, pad_id=0, max_target_length=2),
                                [[5, 1, 0, 0, 0], [4, 1, 0, 0, 0], [2, 3, 0, 0, 0]])


def test_conditional_output_is_cut_to_the_target_length(ref):
  """ids = the stripped target, first max_target_length tokens (max_length − max_condition_length), EOS-masked."""
  model, params, cfg, r = ref
  n, s = cfg["cond"]["cond_len"], r["z0"].shape[1]
  keep = s - n - 3  # as if the condition could be 3 tokens longer than this one
  config = _config(cfg, "cond", max_target_length=keep)
  cond_seq, cond_mask = _condition(cfg, r)
  out = S.make_sampler(model, config)(params, S.SampleInputs(
      r["z0"], r["grid"], condition=S.PinnedLatents(cond_seq, cond_mask)))
  np.testing.assert_array_equal(out.raw_ids, r["ids_cond"])
  targets = np.full_like(r["ids_cond"], config.pad_id)
  targets[:, :keep] = r["ids_cond"][:, n:n + keep]
  np.testing.assert_array_equal(out.ids, _eos_mask_by_hand(targets, config.eos_id, config.pad_id))


def test_random_grid_per_key_and_sorted():
  config = S.SampleConfig.from_config(base_config(), steps=16, grid="logit_normal", noise_scale=2.0, **T5_IDS)
  z0, g0, k0 = S.draw_inputs(jax.random.key(0), config, batch=2, seq_len=4, latent_dim=3)
  _, g1, k1 = S.draw_inputs(jax.random.key(1), config, batch=2, seq_len=4, latent_dim=3)
  _, g0b, _ = S.draw_inputs(jax.random.key(0), config, batch=2, seq_len=4, latent_dim=3)
  for g in (g0, g1):
    assert g.shape == (17,) and g[0] == 0 and g[-1] == 1 and bool(jnp.all(jnp.diff(g) >= 0))
  assert np.abs(g0 - g1).max() > 1e-3 and not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))
  np.testing.assert_array_equal(g0, g0b)
  assert z0.shape == (2, 4, 3)
  np.testing.assert_allclose(S.draw_initial_noise(jax.random.key(4), 64, 16, 32, 2.0).std(), 2.0, rtol=0.05)


class SpyELF(ELF):
  """ELF that records (decode flag, batch size) of every evaluation that actually runs."""

  def __call__(self, x, t, w, mask=None, *, decode=False, deterministic=True):
    jax.debug.callback(lambda xx: CALLS.append((decode, xx.shape[0])), x)
    return super().__call__(x, t, w, mask, decode=decode, deterministic=deterministic)


CALLS = []


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_network_evaluations_per_step(ref, cfg_scale):
  model, params, cfg, r = ref
  cond_seq, cond_mask = _condition(cfg, r)
  config = _config(cfg, "cond", cfg_scale=cfg_scale)
  CALLS.clear()
  out = S.make_sampler(SpyELF(model.config), config)(params, S.SampleInputs(
      r["z0"], r["grid"], condition=S.PinnedLatents(cond_seq, cond_mask)))
  jax.block_until_ready(out)
  jax.effects_barrier()
  b, cfg_on = r["z0"].shape[0], cfg_scale != 1.0
  assert sorted(CALLS) == [(False, b * (2 if cfg_on else 1))] * config.steps + [(True, b)]
  assert sum(n for _, n in CALLS) == b * S.evaluations_per_sample(config.steps, cfg_on)


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(n, 1, 1), ("data", "fsdp", "tensor"))


@pytest.mark.slow
def test_sharded_sampling_matches_single_device(ref):
  """SDE, logit-normal grid, CFG: the same seed gives the same samples on 1 and 8 devices."""
  model, params, cfg, r = ref
  assert len(jax.devices()) == 8
  config = _config(cfg, "cond", method="sde", gamma=1.5, grid="logit_normal")
  b, s, c = 8, r["z0"].shape[1], r["z0"].shape[2]
  cond = S.PinnedLatents(latents=jnp.tile(r["cond_seq"], (3, 1, 1))[:b],
                         mask=jnp.broadcast_to(jnp.arange(s) < cfg["cond"]["cond_len"], (b, s)))
  sampler = S.make_sampler(model, config)
  outs = [S.sample_from_seed(sampler, params, jax.random.key(11), config, batch=b, seq_len=s, latent_dim=c,
                             mesh=_mesh(n), condition=cond, guidance_scale=jnp.linspace(1.0, 3.0, b)) for n in (1, 8)]
  assert len(outs[1].latents.sharding.device_set) == 8
  np.testing.assert_allclose(outs[0].latents, outs[1].latents, atol=1e-5)
  np.testing.assert_array_equal(outs[0].raw_ids, outs[1].raw_ids)
  other = S.sample_from_seed(sampler, params, jax.random.key(12), config, batch=b, seq_len=s, latent_dim=c,
                             condition=cond)
  assert np.abs(other.latents - outs[0].latents).max() > 1e-2


def test_presets():
  c = base_config()
  c.sample.preset = "cond_ode64"
  c.sample.grid = "uniform"
  sc = S.SampleConfig.from_config(c, **T5_IDS)
  assert (sc.method, sc.steps, sc.cfg_scale, sc.guidance_scale, sc.grid) == ("ode", 64, 2.0, 1.0, "uniform")
  assert c.sample.method is None and c.sample.grid == "uniform"  # the config is not modified
  c.sample.preset, c.sample.grid = "owt_sde32", None
  sc = S.SampleConfig.from_config(c, **T5_IDS)
  assert (sc.method, sc.steps, sc.gamma, sc.guidance_scale, sc.noise_scale) == ("sde", 32, 1.5, 3.0,
                                                                               c.flow.denoiser_noise_scale)
  # Every preset is an official sampling config: a fresh logit-normal grid per batch, sigmoid(N(−1.5, 0.8)).
  for name in SAMPLE_PRESETS:
    c.sample.preset = name
    sc = S.SampleConfig.from_config(c, **T5_IDS)
    assert (sc.grid, sc.grid_p_mean, sc.grid_p_std) == ("logit_normal", -1.5, 0.8), name
  c.sample.preset = "nope"
  with pytest.raises(ConfigError, match="sample.preset='nope' is unknown; choose one of owt_sde32, owt_sde64"):
    S.SampleConfig.from_config(c, **T5_IDS)


def test_explicit_sample_fields_beat_the_preset():
  """owt_b samples with the owt_sde32 preset; sample.steps=64 set on the command line or in Python wins over its
  32 (the preset still fills the rest), in the sampler's config and in the printed (resolved) config."""
  on_command_line = config_from_command_line(CONFIGS / "owt_b.py", "--config.sample.steps=64",
                                             "--config.sample.cfg_scale=1")
  in_python = config_from_command_line(CONFIGS / "owt_b.py")
  in_python.sample.steps = 64
  in_python.sample.cfg_scale = 1.0
  for config in (on_command_line, in_python):
    assert config.sample.preset == "owt_sde32"
    validate(config)
    sc = S.SampleConfig.from_config(config, **T5_IDS)
    assert (sc.steps, sc.method, sc.gamma, sc.guidance_scale) == (64, "sde", 1.5, 3.0)
    assert resolve(config).sample.to_dict() == {**config.sample.to_dict(), **SAMPLE_PRESETS["owt_sde32"], "steps": 64}
    assert config.sample.gamma is None  # resolving leaves the config as it was
  # Keyword overrides of from_config are explicit too (the eval sweep's points): the preset fills around them.
  config = config_from_command_line(CONFIGS / "xsum_b.py", "--config.sample.gamma=0.5")
  sc = S.SampleConfig.from_config(config, steps=8, **T5_IDS)
  assert (sc.method, sc.steps, sc.gamma, sc.cfg_scale) == ("ode", 8, 0.5, 2.0)


def test_the_few_step_preset_follows_the_step_count():
  """fewstep: γ and w by sample.steps (unset: the last distillation round's student steps); explicit fields win."""
  config = base_config()
  config.sample.preset = "fewstep"
  config.distill.rounds = "16:4,8:8"
  assert sample_settings(config) == few_step_settings(8)
  assert (sample_settings(config)["gamma"], sample_settings(config, steps=16)["gamma"]) == (1.5, 2.0)
  config.sample.gamma = 0.7
  assert sample_settings(config, steps=16) == {**few_step_settings(16), "gamma": 0.7}


def test_sample_config_target_length_from_the_data():
  """Unconditional outputs are not cut; conditional ones keep max_length − max_condition_length target tokens."""
  c = base_config()
  assert S.SampleConfig.from_config(c, **T5_IDS).max_target_length == 0
  c.data.conditional, c.data.max_length, c.data.max_condition_length = True, 96, 64
  assert S.SampleConfig.from_config(c, **T5_IDS).max_target_length == 96 - 64


def _word_tokenizer(vocab_size):
  words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, vocab_size)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>")


def test_trajectory_view(ref, tmp_path):
  model, params, cfg, r = ref
  config = _config(cfg, "unc", return_trajectory=True)
  out = S.make_sampler(model, config)(params, S.SampleInputs(r["z0"], r["grid"]))
  assert out.trajectory.shape == (config.steps,) + r["z0"].shape
  np.testing.assert_allclose(out.trajectory_t[:, 0], r["grid"][:-1])
  step_ids = trajectory.decode_trajectory(params, model, out.trajectory, config.guidance_scale)
  # Independent check of one step: decode x̂ of step 3 by hand.
  x = jnp.concatenate([out.trajectory[3], jnp.zeros_like(out.trajectory[3])], -1)
  b = r["z0"].shape[0]
  hand = model.apply({"params": params}, x, jnp.ones((b,)), jnp.full((b,), config.guidance_scale), decode=True)
  np.testing.assert_array_equal(step_ids[3], jnp.argmax(hand, -1))

  tok = _word_tokenizer(cfg["vocab_size"])
  paths = trajectory.render_trajectory(str(tmp_path), params, model, out, tok, guidance_scale=config.guidance_scale,
                                       eos_id=config.eos_id, pad_id=config.pad_id, png=True)
  lines = [json.loads(l) for l in open(paths["jsonl"], encoding="utf-8")]
  assert [l["step"] for l in lines] == [str(i) for i in range(config.steps)] + ["final"]
  assert lines[2]["t"] == pytest.approx(float(r["grid"][2])) and lines[-1]["t"] == 1.0
  final_words = [" ".join(f"w{i}" for i in row if i != config.pad_id) for row in np.asarray(out.ids)]
  assert lines[-1]["texts"] == final_words
  assert lines[0]["texts"][0] == " ".join(f"w{i}" for i in S.mask_after_eos(step_ids[0], 1, 0)[0] if i)
  page = open(paths["html"], encoding="utf-8").read()
  assert page.count("<tr>") == b * (config.steps + 2) and "class='chg'" in page
  assert all(w in page for w in final_words[0].split())
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
