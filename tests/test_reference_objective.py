"""The training objective equals the reference train step: given its batch and its random draws, the per-group loss
reproduces the reference's loss and every gradient, for both branches of both batch recipes (fixture
`reference_elf_train`, made by running the authors' own train step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import fixture_config
from elf_jax.objective import flow
from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig, unstack_blocks
from elf_jax.objective import loss as L
from elf_jax.weights import published

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
