"""Precision policy and rematerialisation.

bfloat16 compute: parameters, EMA, loss and outputs stay float32; matmuls really run in bfloat16 while norms
(rsqrt), softmax (exp) and the loss stay float32; bf16 training ends within 5% of float32 training. Remat: every
policy gives the same gradients (with dropout active too, so `deterministic` is static under nn.remat) and full
remat lowers the compiled step's temporary memory.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.objective import flow, optim
from elf_jax.objective import loss as L
from elf_jax.objective import step as step_lib
from elf_jax.weights.encoder import build_encoder

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

B, S, C, V = 16, 16, 16, 32


def _model_config(**kw) -> ModelConfig:
  base = dict(latent_dim=C, hidden_size=64, depth=2, num_heads=4, bottleneck_dim=16, vocab_size=V)
  return ModelConfig.from_config(base_config(), **{**base, **kw})


def _config() -> ml_collections.ConfigDict:
  c = base_config()
  c.model.vocab_size = V
  c.encoder.name_or_path, c.encoder.dim = "random", C
  c.encoder.random_num_layers, c.encoder.random_num_heads, c.encoder.random_d_kv, c.encoder.random_d_ff = 1, 2, 8, 32
  c.encoder.latent_std = 1.0
  c.flow.denoiser_noise_scale, c.flow.decoder_noise_scale, c.flow.P_mean, c.flow.P_std = 1.0, 1.0, -0.4, 1.0
  c.optim.optimizer, c.optim.base_lr, c.optim.global_batch_size, c.optim.warmup_steps = "adamw", 8e-3, B, 10
  c.optim.ema_decay = 0.99
  return c


def _batches(n=4):
  """Structured token rows (arithmetic sequences mod V) with some padding, so the loss can fall."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    start, stride = rng.integers(2, V, (B, 1)), rng.integers(1, 4, (B, 1))
    ids = (2 + (start + stride * np.arange(S)) % (V - 2)).astype(np.int32)
    valid = np.arange(S)[None] < rng.integers(S // 2, S + 1, (B, 1))
    out.append(dict(ids=jnp.asarray(np.where(valid, ids, 0)), valid=jnp.asarray(valid),
                    cond_mask=jnp.zeros((B, S), bool), loss_mask=jnp.asarray(valid)))
  return out


def _train(dtype: str, steps: int):
  c = _config()
  encoder, enc_params = build_encoder(c)
  model = ELF(_model_config(compute_dtype=dtype))
  optimizer = optim.make_optimizer(c.optim, optim.make_schedule(c.optim, 100, steps))
  obj = step_lib.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), num_groups=2)
  train_step = step_lib.make_train_step(obj, optimizer, c.optim)
  state = jax.jit(lambda: step_lib.init_state(model, optimizer, jax.random.key(0), S))()  # distinct EMA buffers
  losses, batches = [], _batches()
  for i in range(steps):
    state, metrics = train_step(state, step_lib.FrozenInputs(enc_params), batches[i % len(batches)])
    losses.append(metrics["loss"])
  return state, metrics, np.asarray(jax.device_get(losses))


def test_bfloat16_training_matches_float32_and_keeps_float32_state():
  steps, window = 120, 30
  state32, _, loss32 = _train("float32", steps)
  state16, metrics16, loss16 = _train("bfloat16", steps)
  # Same seed: both runs draw the same noise and decoder coins, so the windows are paired.
  end32, end16 = loss32[-window:].mean(), loss16[-window:].mean()
  start32 = loss32[:window].mean()
  assert end32 < 0.6 * start32, f"float32 training did not learn ({start32} -> {end32}); the comparison is empty"
  assert abs(end16 - end32) / end32 < 0.05, (start32, end32, end16)
  for tree in (state16.params, state16.ema_params):
    assert {x.dtype for x in jax.tree_util.tree_leaves(tree)} == {jnp.dtype(jnp.float32)}
  assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(metrics16))
  assert not np.allclose(loss16, loss32)  # bf16 really computed something else


def _primitives(jaxpr, found=None):
  """{primitive name: set of input dtypes} over a closed jaxpr and all its sub-jaxprs."""
  found = {} if found is None else found
  for eqn in jaxpr.eqns:
    found.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.invars if hasattr(v, "aval"))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitives(sub.jaxpr, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitives(sub, found)
  return found


def test_bfloat16_policy_in_the_program():
  """Matmuls in bf16; rsqrt (RMSNorm), exp (softmax, timestep features) and the outputs in float32."""
  model = ELF(_model_config(compute_dtype="bfloat16"))
  params = nn.unbox(init_params(model, jax.random.key(0), S))
  x, t, w = jnp.ones((2, S, 2 * C)), jnp.full((2,), 0.5), jnp.full((2,), 2.0)
  for decode in (False, True):
    fn = lambda p: model.apply({"params": p}, x, t, w, decode=decode)
    assert jax.eval_shape(fn, params).dtype == jnp.float32
    prims = _primitives(jax.make_jaxpr(fn)(params).jaxpr)
    assert "bfloat16" in prims["dot_general"]
    assert prims["rsqrt"] == {"float32"} and prims["exp"] == {"float32"}, (prims["rsqrt"], prims["exp"])


def _grads(remat: str):
  """Gradients of the grouped loss with dropout active (both blocks), and the compiled temp bytes."""
  model = ELF(_model_config(remat=remat, dropout_rate=0.1))
  params = nn.unbox(init_params(model, jax.random.key(1), S))
  params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # the final layer is zero-initialised
  rng = np.random.default_rng(1)
  batch = dict(x0=jnp.asarray(rng.normal(size=(B, S, C)), jnp.float32), ids=jnp.asarray(rng.integers(0, V, (B, S))),
               valid=jnp.ones((B, S), bool), cond_mask=jnp.zeros((B, S), bool), loss_mask=jnp.ones((B, S), bool))
  fc = flow.FlowConfig.from_config(base_config(), decoder_prob=0.5)
  noise = L.draw_noise(jax.random.key(2), B, S, C, fc, 2)
  grad_fn = jax.jit(jax.grad(lambda p: L.summarize(L.grouped_loss(model, p, batch, noise, fc), 2)[0]))
  compiled = grad_fn.lower(params).compile()
  temp = compiled.memory_analysis()
  return compiled(params), (temp.temp_size_in_bytes if temp is not None else None)


def test_remat_policies_give_identical_gradients():
  ref, temp_none = _grads("none")
  for policy in ("full", "dots_saveable"):
    grads, temp = _grads(policy)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref)
    if policy == "full" and temp is not None and temp_none is not None:
      assert temp < temp_none, (temp, temp_none)
