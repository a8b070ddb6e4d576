"""Sharded training equals the single-device run on every mesh; parameters really are split; bad meshes fail clearly."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig
from elf_jax.objective import flow, optim
from elf_jax.objective import state as state_lib
from elf_jax.objective import step as S
from elf_jax.parallel import sharding
from elf_jax.parallel.mesh import make_mesh
from elf_jax.weights.encoder import build_encoder

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

B, SEQ, GROUPS = 16, 8, 8


def _config():
  c = base_config()
  c.model.update(hidden_size=48, depth=1, num_heads=4, bottleneck_dim=8, vocab_size=40)
  c.encoder.update(name_or_path="random", dim=16, random_num_layers=1, random_num_heads=2, random_d_kv=8,
                   random_d_ff=32)
  c.flow.update(decoder_groups=GROUPS, decoder_prob=0.5)
  c.optim.update(global_batch_size=B, optimizer="adamw")
  return c


@pytest.fixture(scope="module")
def setup():
  c = _config()
  model = ELF(ModelConfig.from_config(c))
  encoder, encoder_params = build_encoder(c)
  frozen = S.FrozenInputs(encoder_params)
  obj = S.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), GROUPS)
  optimizer = optim.make_optimizer(c.optim, 1e-3)
  rs = np.random.RandomState(0)
  valid = np.ones((B, SEQ), bool)
  valid[:, 6:] = False
  batch = dict(ids=jnp.asarray(rs.randint(3, 40, (B, SEQ)), jnp.int32), valid=jnp.asarray(valid),
               cond_mask=jnp.zeros((B, SEQ), bool), loss_mask=jnp.asarray(valid))
  single = _run(c, model, obj, optimizer, frozen, batch, None)
  return c, model, obj, optimizer, frozen, batch, single


def _shardings(c, model, optimizer, mesh):
  boxed = jax.eval_shape(lambda: S.init_boxed_state(model, optimizer, jax.random.PRNGKey(0), SEQ))
  return state_lib.state_shardings(mesh, boxed, sharding.rules_from_config(c))


def _perturbed_state(model, optimizer):
  """A fresh state whose parameters all carry noise (no zero-initialised layer, so no gradient is exactly zero:
  Adam would turn float noise on a zero gradient into an O(lr) step and make the comparison meaningless)."""
  state = S.init_state(model, optimizer, jax.random.PRNGKey(0), SEQ)
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return state.replace(params=params, ema_params=params)


def _run(c, model, obj, optimizer, frozen, batch, mesh):
  """Loss and grads at init, then params and per-step losses after two steps."""
  init = lambda: _perturbed_state(model, optimizer)
  sh = None if mesh is None else _shardings(c, model, optimizer, mesh)
  state = jax.jit(init, out_shardings=sh)()
  grad_fn = jax.jit(jax.grad(lambda p: S.compute_loss(p, frozen, batch, jax.random.PRNGKey(5), obj, mesh)[0]))
  grads = grad_fn(state.params)
  step = S.make_train_step(obj, optimizer, c.optim, mesh, sh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  return dict(losses=losses, grads=grads, state=state)


def _max_rel(a, b):
  """Largest relative error ||a - b|| / ||b|| over the leaves."""
  return max(float(jnp.linalg.norm(x - y) / (jnp.linalg.norm(y) + 1e-12))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _tree_rel(a, b):
  """Relative error of the whole tree, ||a - b|| / ||b|| over all leaves together. Used for parameters after Adam
  steps: Adam divides each gradient by its own scale, so float noise on an analytically zero gradient (e.g. the
  key bias, which softmax ignores) becomes an O(lr) change of that one leaf however the sum was ordered."""
  leaf_pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  diff = sum(float(jnp.sum(jnp.square(x - y))) for x, y in leaf_pairs)
  ref = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree_util.tree_leaves(b))
  return (diff / ref) ** 0.5


# Pure data parallelism over all 8 devices (8 coin groups), and every axis split at once (batch over data x fsdp,
# parameters over fsdp x tensor); fsdp alone runs in tests/integration/test_multiprocess.py (1 x 8).
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_equals_single_device(setup, shape):
  c, model, obj, optimizer, frozen, batch, single = setup
  c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  mesh = make_mesh(c.mesh, jax.devices()[:int(np.prod(shape))])  # the tensor-only mesh uses 4 of the 8 devices
  out = _run(c, model, obj, optimizer, frozen, batch, mesh)
  np.testing.assert_allclose(out["losses"], single["losses"], rtol=1e-5)
  assert _max_rel(out["grads"], single["grads"]) < 1e-5
  assert _tree_rel(out["state"].params, single["state"].params) < 1e-5
  assert _tree_rel(out["state"].ema_params, single["state"].ema_params) < 1e-5

  # Parameters are split over fsdp x tensor: every block kernel holds exactly 1 / (fsdp * tensor) of itself per
  # device; the whole tree (small embedders and norms are less split at this toy size) about that.
  params = out["state"].params
  split = shape[1] * shape[2]
  dev0 = jax.devices()[0]
  local_bytes = lambda x: sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)
  block = params["blocks"]  # stacked over the layer axis, which is not split
  for kernel in (block["attn"]["qkv"]["kernel"], block["attn"]["proj"]["kernel"], block["mlp"]["w12"]["kernel"],
                 block["mlp"]["w3"]["kernel"]):
    assert local_bytes(kernel) * split == kernel.nbytes
  for x in jax.tree_util.tree_leaves(params):  # every leaf is split exactly as its spec says
    ways = int(np.prod([mesh.shape[a] for axes in x.sharding.spec if axes for a in np.atleast_1d(axes)]))
    assert local_bytes(x) * ways == x.nbytes
  if split > 1:
    assert block["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_mesh_that_does_not_divide_heads_batch_or_params_is_rejected():
  c = _config()
  c.mesh.update(data=1, fsdp=1, tensor=8)
  with pytest.raises(ValueError, match="num_heads=4 is not divisible by mesh.tensor=8"):
    sharding.check_mesh(make_mesh(c.mesh), 4, B)
  c.mesh.update(data=8, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="batch 12 .* not divisible by the 8 batch shards"):
    sharding.check_mesh(make_mesh(c.mesh), 4, 12)
  c.model.hidden_size = 56  # MLP hidden int(int(4 * 56) * 2 / 3) = 149 cannot be split in two
  model = ELF(ModelConfig.from_config(c))
  c.mesh.update(data=4, fsdp=1, tensor=2)
  with pytest.raises(ValueError, match=r"w3.*dim 149 over mesh axes tensor"):
    _shardings(c, model, optim.make_optimizer(c.optim, 1e-3), make_mesh(c.mesh))


def test_groups_must_fit_the_mesh():
  c = _config()
  c.mesh.update(data=8, fsdp=1, tensor=1)
  mesh = make_mesh(c.mesh)
  c.flow.decoder_groups = 4
  with pytest.raises(ValueError, match="multiple of the 8 batch shards"):
    S.resolve_num_groups(c, mesh, 16)
  c.flow.decoder_groups = -1
  assert S.resolve_num_groups(c, mesh, 16) == 8
  with pytest.raises(ValueError, match="divide the per-step batch"):
    S.resolve_num_groups(c, mesh, 12)
