"""The whole ELF model with the Pallas attention (interpret mode) equals the XLA one: forward, loss gradient, and the
sharded train step, where the kernel must run per (batch, head) shard of the mesh."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.objective import flow
from elf_jax.objective import loss as L
from elf_jax.objective import state as state_lib
from elf_jax.objective import step as S
from elf_jax.ops import attention as attn
from elf_jax.parallel import sharding
from elf_jax.parallel.mesh import make_mesh
from elf_jax.weights.encoder import build_encoder

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

B, SEQ, GROUPS, HEADS = 8, 8, 4, 4
LR = 1e3  # SGD step: new params = params - LR * grads, so the step's gradient is read back to ~1e-7 relative


def _config():
  c = base_config()
  c.model.update(hidden_size=48, depth=1, num_heads=HEADS, bottleneck_dim=8, vocab_size=40)
  c.encoder.update(name_or_path="random", dim=16, random_num_layers=1, random_num_heads=2, random_d_kv=8,
                   random_d_ff=32)
  c.flow.update(decoder_groups=GROUPS, decoder_prob=0.5)
  c.optim.update(global_batch_size=B)
  return c


@pytest.fixture(scope="module")
def setup():
  c = _config()
  encoder, encoder_params = build_encoder(c)
  frozen = S.FrozenInputs(encoder_params)
  models = {}
  for impl in ("xla", "pallas"):
    c.model.attention_impl = impl
    models[impl] = ELF(ModelConfig.from_config(c))
  params = jax.jit(lambda: init_params(models["xla"], jax.random.PRNGKey(0), SEQ))()
  leaves, tree = jax.tree_util.tree_flatten(params)  # noise on every leaf: no zero-initialised layer, no zero grad
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rs = np.random.RandomState(0)
  valid = np.ones((B, SEQ), bool)
  valid[1::2, 5:] = False  # half the rows padded: the key mask matters
  batch = dict(ids=jnp.asarray(rs.randint(3, 40, (B, SEQ)), jnp.int32), valid=jnp.asarray(valid),
               cond_mask=jnp.zeros((B, SEQ), bool), loss_mask=jnp.asarray(valid))
  return c, encoder, frozen, models, params, batch


def _tree_rel(a, b):
  """||a - b|| / ||b|| over all leaves together."""
  leaf_pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  diff = sum(float(jnp.sum(jnp.square(x - y))) for x, y in leaf_pairs)
  return (diff / sum(float(jnp.sum(jnp.square(y))) for y in jax.tree_util.tree_leaves(b))) ** 0.5


def test_forward_and_loss_gradient_match_without_mesh(setup):
  c, encoder, frozen, models, params, batch = setup
  x = jax.random.normal(jax.random.PRNGKey(2), (B, SEQ, 2 * encoder.dim))
  t, w = jnp.linspace(0.1, 0.9, B), jnp.full((B,), 2.0)
  outs = {}
  for impl, model in models.items():
    # x̂ of the denoiser; the loss covers both branches (denoising and decoding groups, decoder_prob 0.5).
    fwd = jax.jit(lambda p, model=model: model.apply({"params": p}, x, t, w, batch["valid"]))
    obj = S.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), GROUPS)
    grad = jax.jit(jax.value_and_grad(
        lambda p, obj=obj: S.compute_loss(p, frozen, batch, jax.random.PRNGKey(5), obj)[0]))
    outs[impl] = (fwd(params), *grad(params))
  np.testing.assert_allclose(outs["pallas"][0], outs["xla"][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs["pallas"][1], outs["xla"][1], rtol=1e-5)
  assert _tree_rel(outs["pallas"][2], outs["xla"][2]) < 1e-5


def _pallas_operand_shapes(jaxpr):
  """Shapes of the first operand (q in kernel layout (B, N, Lp, Dp)) of every pallas_call, nested jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      shapes.append(eqn.invars[0].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _pallas_operand_shapes(sub)
  return shapes


def _train_step(c, encoder, model, mesh):
  """One real train step (SGD, lr LR) on `mesh` (None = one device) and its state shardings."""
  obj = S.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), GROUPS)
  optimizer = optax.sgd(LR)
  shardings = None
  if mesh is not None:
    boxed = jax.eval_shape(lambda: S.init_boxed_state(model, optimizer, jax.random.PRNGKey(0), SEQ))
    shardings = state_lib.state_shardings(mesh, boxed, sharding.rules_from_config(c))
  return S.make_train_step(obj, optimizer, c.optim, mesh, shardings), optimizer, shardings


def _state(model, optimizer, params, shardings):
  """A fresh state holding copies of `params` (the step donates its state)."""
  copy = lambda: jax.tree_util.tree_map(jnp.copy, params)
  state = S.init_state(model, optimizer, jax.random.PRNGKey(0), SEQ).replace(params=copy(), ema_params=copy())
  return state if shardings is None else jax.device_put(state, shardings)


@pytest.fixture(scope="module")
def single_device_xla(setup):
  """Loss and state after one step of the XLA model on one device: the reference of every mesh."""
  c, encoder, frozen, models, params, batch = setup
  step, optimizer, _ = _train_step(c, encoder, models["xla"], None)
  return step(_state(models["xla"], optimizer, params, None), frozen, batch)


@pytest.mark.parametrize("shape", [(2, 2, 2)])  # batch over data x fsdp and heads over tensor at once
def test_sharded_train_step_with_pallas_matches_single_device_xla(setup, single_device_xla, shape):
  c, encoder, frozen, models, params, batch = setup
  want_state, want = single_device_xla
  c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  mesh = make_mesh(c.mesh, jax.devices()[:int(np.prod(shape))])
  step, optimizer, shardings = _train_step(c, encoder, models["pallas"], mesh)
  state = _state(models["pallas"], optimizer, params, shardings)
  traced = step.trace(state, frozen, batch)
  # The kernel (forward, dQ, dK/dV) runs per shard: each of its calls sees one coin group's rows (groups are
  # split over data x fsdp by the loss's shard_map, or mapped over on one batch shard) — or, in the x_sc = 0 pass
  # of the opt-in fixed_count self-conditioning draw, the group's self-conditioned rows — and HEADS / tensor heads.
  local = _pallas_operand_shapes(traced.jaxpr.jaxpr)
  group = B // GROUPS
  rows = {group, L.self_cond_pass_rows(group, flow.FlowConfig.from_config(c))}
  assert local and {s[:2] for s in local} == {(r, HEADS // shape[2]) for r in rows}, local
  got_state, got = traced.lower().compile()(state, frozen, batch)

  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  grad = lambda new: jax.tree_util.tree_map(lambda p, q: (p - q) / LR, params, new.params)
  assert _tree_rel(grad(got_state), grad(want_state)) < 1e-5


def test_shard_plan_makes_every_free_axis_manual():
  mesh = make_mesh(dict(data=2, fsdp=1, tensor=2), jax.devices()[:4]).abstract_mesh
  # Size-1 axes are made manual too: a Mosaic kernel may not sit in a partly automatic region.
  assert attn.shard_plan(mesh) == (("data",), "tensor", ("data", "fsdp", "tensor"))
  manual = mesh.update_axis_types({"data": jax.sharding.AxisType.Manual})  # inside a shard_map over "data"
  assert attn.shard_plan(manual) == ((), "tensor", ("fsdp", "tensor"))


@pytest.mark.parametrize("rows, heads", [(6, 3), (1, 4)])
def test_pallas_pads_rows_and_heads_the_mesh_does_not_divide(rows, heads):
  """6 rows over data x fsdp = 4 shards and 3 heads over tensor = 2 (or 1 row): every kernel call still runs on one
  shard's ceil(rows / 4) rows and ceil(heads / 2) heads, and output and gradients equal the XLA reference."""
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  seq, head_dim = 13, 8
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k, v, d_out = (jax.random.normal(key, (rows, seq, heads, head_dim)) for key in keys)
  mask = jnp.arange(seq)[None, :] < jnp.arange(seq, seq - rows, -1)[:, None]  # row i: seq - i valid keys

  def out_and_grads(impl):
    def loss(q, k, v):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        out = attn.attention(q, k, v, mask, impl=impl, block_q=8, block_k=8)
      return jnp.sum(out * d_out), out

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), in_shardings=replicated), (q, k, v)

  fn, args = out_and_grads("pallas")
  local = _pallas_operand_shapes(fn.trace(*args).jaxpr.jaxpr)
  assert local and {s[:2] for s in local} == {(-(-rows // 4), -(-heads // 2))}, local
  (got_grads, got), (want_grads, want) = fn(*args), out_and_grads("xla")[0](*args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
