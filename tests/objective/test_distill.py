"""Progressive distillation (issue 15): the objective against the authors' PyTorch code (`pd.npz` of
reference_elf_train), the draws of a step and the rounds' spec (`--mode=distill` end to end:
tests/run/test_distill_loop.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax.config import ConfigError, base_config, parse_distill_rounds, validate
from elf_jax.model import elf
from elf_jax.model.elf import ELF, ModelConfig
from elf_jax.objective import distill
from elf_jax.objective.flow import FlowConfig
from elf_jax.weights import published

from tests.conftest import fixture_config


def rel_err(ours, ref) -> float:
  """‖ours − ref‖ / ‖ref‖ (Frobenius), the fixture README's metric."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def pd(train_fixture_dir):
  """The fixture's network (teacher = student), settings, batch and draws, and our per-example loss on them."""
  cfg = fixture_config(train_fixture_dir)
  ref = dict(np.load(train_fixture_dir / "pd.npz"))
  params = jax.tree.map(jnp.asarray, published.load_published_elf(train_fixture_dir / "checkpoint.msgpack", "raw"))
  model = ELF(ModelConfig.from_params(params))
  s = cfg["pd"]
  fc = FlowConfig.from_config(base_config(), denoiser_noise_scale=s["denoiser_noise_scale"],
                              decoder_noise_scale=s["decoder_noise_scale"], t_eps=s["t_eps"])
  # The draws (t_s, t_t) are the fixture's, so the student's step count (its span) is not read here.
  dc = distill.DistillConfig.from_config(base_config(), 16, s["teacher_sub_steps"], span_fallback=s["span_fallback"])
  assert ref["pd/sub_step_times"].shape[1] == s["teacher_sub_steps"] + 1
  batch = dict(x0=ref["pd/x0"], ids=ref["pd/input_ids"], cond_mask=ref["pd/cond_mask"] > 0,
               loss_mask=ref["pd/loss_mask"] > 0)
  noise = dict(decoder=ref["pd/decoder"] > 0, t_s=ref["pd/t_s"], t_t=ref["pd/t_t"], w=ref["pd/w"],
               use_self_cond=ref["pd/use_self_cond"] > 0, eps=ref["pd/noise"],
               sub_step_times=ref["pd/sub_step_times"], decoder_lambda=ref["pd/decoder_lambda"],
               decoder_noise=ref["pd/decoder_noise"])
  rows, aux = jax.jit(lambda p: distill.per_example_loss(model, p, p, batch, noise, fc, dc))(params)
  return dict(ref=ref, model=model, params=params, fc=fc, dc=dc, batch=batch, noise=noise, rows=rows, aux=aux)


def _pd_positions(pd):
  """(B,S) bool: the denoising rows' non-condition positions, all the PD loss reads of a target."""
  ref = pd["ref"]
  return (ref["pd/decoder"] == 0)[:, None] & (ref["pd/cond_mask"] == 0)


def test_teacher_seed_and_self_conditioning_half(pd):
  assert rel_err(pd["aux"]["teacher_x_init"], pd["ref"]["pd/teacher_x_init"]) <= 1e-5
  assert rel_err(pd["aux"]["sc_half"], pd["ref"]["pd/sc_half"]) <= 1e-5


@pytest.mark.parametrize("grid", ["k", "uniform", "1"])
def test_pd_targets_on_denoising_rows(pd, grid):
  """K sub-steps on the drawn grid, K evenly spaced sub-steps, and K = 1 (the teacher's own x̂)."""
  ref, noise, batch = pd["ref"], pd["noise"], pd["batch"]
  t_s, t_t = noise["t_s"][:, None], noise["t_t"][:, None]
  k = pd["dc"].teacher_sub_steps
  if grid == "k":
    target = pd["aux"]["target"]
  else:
    fractions = np.linspace(0.0, 1.0, k + 1 if grid == "uniform" else 2, dtype=np.float32)
    times = t_s + (t_t - t_s) * fractions
    target = distill.teacher_target(pd["model"], pd["params"], batch["x0"], batch["cond_mask"], ref["pd/z_s"],
                                    noise["t_s"], noise["t_t"], noise["w"], ref["pd/sc_half"], times,
                                    pd["fc"].t_eps, pd["dc"].span_fallback)
  where = _pd_positions(pd)
  assert rel_err(np.asarray(target)[where], ref[f"pd/target_{grid}"][where]) <= 1e-5


def test_per_example_loss_and_loss(pd):
  ref = pd["ref"]
  np.testing.assert_allclose(pd["rows"], ref["pd/per_example_loss"], rtol=1e-5)
  loss, metrics = distill.distill_loss(pd["model"], pd["params"], pd["params"], pd["batch"], pd["noise"], pd["fc"],
                                       pd["dc"])
  np.testing.assert_allclose(loss, ref["pd/loss"], rtol=1e-5)
  dec = ref["pd/decoder"] > 0
  np.testing.assert_allclose(metrics["decode_loss"], ref["pd/per_example_loss"][dec].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["denoise_loss"], ref["pd/per_example_loss"][~dec].mean(), rtol=1e-5)


def test_gradients_per_leaf(pd):
  """Every gradient leaf of the student (teacher frozen: the same values, a separate argument)."""
  ref, teacher = pd["ref"], pd["params"]
  grads = jax.jit(jax.grad(lambda p: distill.distill_loss(pd["model"], p, teacher, pd["batch"], pd["noise"],
                                                          pd["fc"], pd["dc"])[0]))(pd["params"])
  flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v  # published names: the blocks unstacked
          for k, v in jax.tree_util.tree_leaves_with_path(elf.unstack_blocks(grads))}
  want = {k[len("pd/grads/"):]: v for k, v in ref.items() if k.startswith("pd/grads/")}
  assert sorted(flat) == sorted(want)
  for name, g in want.items():
    if not np.any(g):
      assert np.abs(np.asarray(flat[name])).max() <= 1e-7, name
    else:
      assert rel_err(flat[name], g) <= 1e-5, name


def test_per_example_mode_gate_matches_the_static_flag(pd):
  """A (B,) gate gives, row by row, the x̂ of decode=False (gate 0) and the logits of decode=True (gate 1)."""
  model, params, ref = pd["model"], pd["params"], pd["ref"]
  x = np.concatenate([ref["pd/z_s"], ref["pd/sc_half"]], -1)
  t, w = ref["pd/t_s"], ref["pd/w"]
  gate = np.array([0, 1, 0, 1, 1, 0], np.float32)[: len(t)]
  x_hat, logits = model.apply({"params": params}, x, t, w, decode=gate)
  off = model.apply({"params": params}, x, t, w)
  on = model.apply({"params": params}, x, t, w, decode=True)
  np.testing.assert_allclose(x_hat[gate == 0], off[gate == 0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(logits[gate == 1], on[gate == 1], rtol=1e-6, atol=1e-6)


def test_draws_of_a_step():
  """Decoder rows sit at t = 1 with no self-conditioning; denoising rows span exactly Δ inside [0, 1]; the teacher's
  sub-step grid runs from t_s to t_t, sorted."""
  fc = FlowConfig.from_config(base_config(), decoder_prob=0.3, self_cond_prob=0.5)
  for steps, sub in [(4, 3), (1, 8), (16, 1)]:
    dc = distill.DistillConfig.from_config(base_config(), steps, sub)
    n = distill.draw_noise(jax.random.key(steps), 512, 3, 2, fc, dc)
    dec = np.asarray(n["decoder"])
    t_s, t_t, grid = map(np.asarray, (n["t_s"], n["t_t"], n["sub_step_times"]))
    assert 0.2 < dec.mean() < 0.4 and not np.any(np.asarray(n["use_self_cond"])[dec])
    np.testing.assert_array_equal(t_s[dec], 1.0)
    np.testing.assert_array_equal(t_t[dec], 1.0)
    np.testing.assert_allclose(t_t[~dec] - t_s[~dec], 1.0 / steps, atol=1e-6)
    assert t_s.min() >= 0 and t_t.max() <= 1 + 1e-6
    assert grid.shape == (512, sub + 1) and np.all(np.diff(grid, axis=1) >= 0)
    np.testing.assert_array_equal(grid[:, 0], t_s)
    np.testing.assert_array_equal(grid[:, -1], t_t)


def test_rounds_spec():
  """distill.rounds is parsed by one function, which validate runs before anything is built."""
  assert parse_distill_rounds("16:4, 8:8,1:64") == [(16, 4), (8, 8), (1, 64)]
  config = base_config()
  for bad in ("", "16", "16:0", "a:4"):
    with pytest.raises(ConfigError, match="distill.rounds"):
      parse_distill_rounds(bad)
    config.distill.rounds = bad
    with pytest.raises(ConfigError, match="distill.rounds"):
      validate(config)
