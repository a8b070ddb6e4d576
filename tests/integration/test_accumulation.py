"""Gradient accumulation inside the jitted train step equals the reference's optax chain.

The reference optimizer is `chain(clip_by_global_norm(c), MultiSteps(inner, k))` fed one micro-batch gradient per
call. Our step gets the whole batch, splits it into k micro-batches (rows j, j + k, ... form micro-batch j), clips
and averages their gradients in a `lax.scan` and applies one update, one EMA update and one step increment. With
the same micro-batches and the same per-micro-batch rngs (`fold_in(step rng, j)`) both give the same parameters and
optimizer state (per leaf, relative Frobenius ≤ 1e-5); metrics are the mean over micro-batches of what each defines.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig
from elf_jax.objective import flow, optim
from elf_jax.objective import state as state_lib
from elf_jax.objective import step as S
from elf_jax.parallel import sharding
from elf_jax.parallel.mesh import make_mesh
from elf_jax.run import aot
from elf_jax.weights.encoder import build_encoder

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

B, SEQ, LR, EMA_DECAY = 16, 8, 1e-2, 0.5


def _config(optimizer, accum, decoder_prob):
  c = base_config()
  c.model.update(hidden_size=48, depth=1, num_heads=4, bottleneck_dim=8, vocab_size=40)
  c.encoder.update(name_or_path="random", dim=16, random_num_layers=1, random_num_heads=2, random_d_kv=8,
                   random_d_ff=32)
  c.flow.update(decoder_groups=1, decoder_prob=decoder_prob)
  c.optim.update(global_batch_size=B, grad_accum_steps=accum, optimizer=optimizer, ema_decay=EMA_DECAY)
  return c


def _batch():
  rs = np.random.RandomState(0)
  valid = np.arange(SEQ)[None] < rs.randint(SEQ // 2, SEQ + 1, (B, 1))
  return dict(ids=jnp.asarray(rs.randint(3, 40, (B, SEQ)), jnp.int32), valid=jnp.asarray(valid),
              cond_mask=jnp.zeros((B, SEQ), bool), loss_mask=jnp.asarray(valid))


def _state(model, optimizer):
  """A fresh state with noise on every parameter (no exactly-zero gradient for Adam to amplify)."""
  state = S.init_state(model, optimizer, jax.random.PRNGKey(0), SEQ)
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return state.replace(params=params, ema_params=params)


def _assert_close(ours, ref, rtol=1e-5):
  """Per leaf ‖ours − ref‖ / ‖ref‖ ≤ rtol (integer leaves, e.g. step counters, exactly equal)."""
  ours_leaves, ref_leaves = jax.tree.leaves(ours), jax.tree.leaves(ref)
  assert len(ours_leaves) == len(ref_leaves)
  for (path, b), a in zip(jax.tree_util.tree_flatten_with_path(ref)[0], ours_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (jax.tree_util.keystr(path), a.shape, b.shape)
    if not np.issubdtype(b.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
      continue
    a, b = a.astype(np.float64), b.astype(np.float64)
    error = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


def _reference_micro_steps(c, obj, frozen, state, batch):
  """Per micro-batch (rows j::k, rng fold_in(step rng, j)): (loss, metrics), gradient — as the step draws them."""
  k = c.optim.grad_accum_steps
  _, step_rng = jax.random.split(state.rng)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b, r: S.compute_loss(p, frozen, b, r, obj), has_aux=True))
  return [grad_fn(state.params, jax.tree.map(lambda x: x[j::k], batch), jax.random.fold_in(step_rng, j))
          for j in range(k)]


@pytest.mark.parametrize("optimizer, accum, decoder_prob", [("muon", 4, 0.5), ("adamw", 2, 0.0), ("muon", 1, 1.0)])
def test_step_equals_clip_then_multisteps(optimizer, accum, decoder_prob):
  c = _config(optimizer, accum, decoder_prob)
  model = ELF(ModelConfig.from_config(c))
  encoder, encoder_params = build_encoder(c)
  frozen = S.FrozenInputs(encoder_params)
  inner = optim.make_optimizer(c.optim, LR)
  obj = S.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), S.resolve_num_groups(c, None, B // accum))
  state, batch = _state(model, inner), _batch()

  micro = _reference_micro_steps(c, obj, frozen, state, batch)
  norms = [float(optax.tree.norm(g)) for _, g in micro]
  # The clip threshold sits between the micro-batch gradient norms: some are clipped, some are not.
  c.optim.grad_clip = float(np.median(norms)) if accum > 1 else 0.5 * norms[0]

  # k > 1: the reference's chain; k = 1: one plain clipped update.
  accumulate = optax.MultiSteps(inner, accum) if accum > 1 else inner
  reference = optax.chain(optax.clip_by_global_norm(c.optim.grad_clip), accumulate)
  ref_params, ref_opt = state.params, reference.init(state.params)
  for _, grads in micro:
    updates, ref_opt = reference.update(grads, ref_opt, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
  ref_inner = ref_opt[1].inner_opt_state if accum > 1 else ref_opt[1]
  if accum > 1:
    assert int(ref_opt[1].gradient_step) == 1  # the chain applied exactly one update

  step = S.make_train_step(obj, inner, c.optim)
  new, metrics = step(jax.tree.map(jnp.copy, state), frozen, batch)

  assert int(new.step) == 1
  np.testing.assert_array_equal(new.rng, jax.random.split(state.rng)[0])
  _assert_close(new.params, ref_params)
  _assert_close(new.opt_state, ref_inner)
  _assert_close(new.ema_params, jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * p, state.ema_params,
                                             ref_params))
  assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])

  # Metrics: the mean over micro-batches of each metric where that micro-batch defines it (not NaN).
  per_micro = {key: np.array([float(m[key]) for (_, m), _ in micro]) for key in micro[0][0][1]}
  per_micro["grad_norm"] = np.array(norms)
  assert set(metrics) == set(per_micro)
  for key, values in per_micro.items():
    want = np.mean(values[~np.isnan(values)]) if (~np.isnan(values)).any() else np.nan
    np.testing.assert_allclose(float(metrics[key]), want, rtol=1e-5, err_msg=key)
  fractions = per_micro["decode_fraction"]
  if decoder_prob == 0.5:  # the draws mix the branches: a NaN in some micro-batches is left out, not propagated
    assert 0 < fractions.sum() < accum and np.isfinite(float(metrics["decode_loss"]))
    assert np.isfinite(float(metrics["denoise_loss"]))
  else:
    assert (fractions == decoder_prob).all()


def test_sharded_accumulation_equals_single_device():
  """Micro-batches stay sharded over the batch axes (data × fsdp): the 2 × 2 mesh gives the single-device step."""
  c = _config("adamw", 2, 0.5)
  c.flow.decoder_groups = 4  # a multiple of the 4 batch shards, the same groups on one device
  model = ELF(ModelConfig.from_config(c))
  encoder, encoder_params = build_encoder(c)
  frozen = S.FrozenInputs(encoder_params)
  optimizer = optim.make_optimizer(c.optim, LR)
  batch = _batch()
  results = []
  for shape in (None, (2, 2, 1)):
    mesh, shardings = None, None
    if shape is not None:
      c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
      mesh = make_mesh(c.mesh, jax.devices()[:4])
      boxed = jax.eval_shape(lambda: S.init_boxed_state(model, optimizer, jax.random.PRNGKey(0), SEQ))
      shardings = state_lib.state_shardings(mesh, boxed, sharding.rules_from_config(c))
    groups = S.resolve_num_groups(c, mesh, B // c.optim.grad_accum_steps)
    obj = S.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), groups)
    state = jax.jit(lambda: _state(model, optimizer), out_shardings=shardings)()
    results.append(S.make_train_step(obj, optimizer, c.optim, mesh, shardings)(state, frozen, batch))
  (single, single_metrics), (sharded, sharded_metrics) = results
  np.testing.assert_allclose(float(sharded_metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
  ref_norm = sum(float(jnp.sum(jnp.square(p))) for p in jax.tree.leaves(single.params)) ** 0.5
  diff = sum(float(jnp.sum(jnp.square(a - b))) for a, b in zip(jax.tree.leaves(sharded.params),
                                                                jax.tree.leaves(single.params))) ** 0.5
  assert diff / ref_norm < 1e-5


def test_compile_mode_compiles_the_whole_step():
  """`--mode=compile` lowers the step on the whole per-update batch (all micro-batches), not on one micro-batch."""
  c = _config("adamw", 2, 0.5)
  c.flow.decoder_groups = 4
  c.data.max_length = SEQ
  c.mesh.update(data=2, fsdp=2, tensor=1)
  report = aot.compile_train_step(c, jax.devices()[:4], topology="cpu-4")
  assert report.batch_shape == (c.optim.global_batch_size, SEQ)
  assert report.memory.argument_bytes > 0 and report.flops > 0
