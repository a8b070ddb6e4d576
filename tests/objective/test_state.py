"""TrainState shardings: one NamedSharding per array of the state, for every optimizer (Muon's masked Adam part
included), usable as the abstract state of an ahead-of-time compile and as the out_shardings of its creation."""
import flax.linen as nn
import jax
import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ELF, ModelConfig
from elf_jax.objective import optim
from elf_jax.objective import state as state_lib
from elf_jax.objective import step as step_lib
from elf_jax.parallel import sharding
from elf_jax.parallel.mesh import make_mesh


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_state_shardings_follow_the_unboxed_state(optimizer):
  c = base_config()
  c.model.update(hidden_size=32, depth=2, num_heads=2, bottleneck_dim=8, vocab_size=24)
  c.encoder.dim = 16
  c.optim.optimizer = optimizer
  c.mesh.update(data=1, fsdp=4, tensor=1)
  mesh = make_mesh(c.mesh, jax.devices()[:4])
  model, opt = ELF(ModelConfig.from_config(c)), optim.make_optimizer(c.optim, 1e-3)
  boxed = jax.eval_shape(lambda: step_lib.init_boxed_state(model, opt, jax.random.PRNGKey(0), 8))
  shardings = state_lib.state_shardings(mesh, boxed, sharding.rules_from_config(c))
  # The abstract state of `--mode=compile`: the unboxed state's structure, a sharding per array.
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                          shardings)
  state = jax.jit(lambda: step_lib.init_state(model, opt, jax.random.PRNGKey(0), 8), out_shardings=shardings)()
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.sharding == want.sharding
  kernel = state.params["blocks"]["mlp"]["w12"]["kernel"]  # (layers, embed, mlp): embed over fsdp, mlp over tensor
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
