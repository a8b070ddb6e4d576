"""Tests for elf_jax.run.checkpoint: save/restore with a grain iterator, keep-N, sharded restore, corrupt steps,
the SIGTERM flag, and the EMA of a workdir's latest checkpoint as `init_from` reads it."""
import logging
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elf_jax.objective.state import TrainState
from elf_jax.run import checkpoint, train_loop
from elf_jax.weights import published

from tests.conftest import assert_trees_equal


def _state(step, scale=1.0):
  params = {"kernel": scale * jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4),
            "bias": jnp.full((4,), scale), "tokens": scale * jnp.ones((1, 4, 4))}
  opt_state = optax.contrib.muon(1e-3).init(params)  # masked Muon / Adam partitions, as in training
  return TrainState(step=jnp.int32(step), params=params, ema_params=jax.tree.map(lambda x: 0.5 * x, params),
                    opt_state=opt_state, rng=jax.random.key_data(jax.random.PRNGKey(step)))


def _abstract(state, sharding_fn=lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0])):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def _iterator():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_round_trip_with_data_iterator(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=3, async_save=True)
  assert manager.latest_step() is None
  assert manager.restore(_abstract(_state(0))) is None
  it = _iterator()
  for _ in range(3):
    next(it)
  state = _state(7, scale=2.0)
  assert manager.save(7, state, data_iterator=it)
  expected_next = [next(it) for _ in range(2)]  # advancing after the save must not change what was saved
  manager.wait()
  assert manager.latest_step() == 7

  fresh = _iterator()
  restored = checkpoint.CheckpointManager(tmp_path).restore(_abstract(_state(0)), data_iterator=fresh)
  assert_trees_equal(restored, state)
  for want in expected_next:
    np.testing.assert_array_equal(next(fresh), want)
  manager.close()


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
  """README's run uses a relative workdir (runs/tiny); orbax only takes absolute paths."""
  monkeypatch.chdir(tmp_path)
  manager = checkpoint.CheckpointManager("runs/tiny/checkpoints", async_save=True)
  state = _state(3, scale=2.0)
  assert manager.save(3, state)
  manager.wait()
  assert (tmp_path / "runs" / "tiny" / "checkpoints" / "3").is_dir()
  assert_trees_equal(checkpoint.CheckpointManager("runs/tiny/checkpoints").restore(_abstract(_state(0))), state)
  manager.close()


def test_keeps_the_newest_n_and_honours_the_interval(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=2, async_save=False, save_interval_steps=2)
  saved = [manager.save(s, _state(s)) for s in range(1, 8)]
  assert saved == [True, True, False, True, False, True, False]  # orbax always saves into an empty directory
  assert manager.save(7, _state(7), force=True)
  manager.wait()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]
  assert int(manager.restore(_abstract(_state(0))).step) == 7
  assert int(manager.restore(_abstract(_state(0)), step=6).step) == 6


def test_restore_onto_a_sharded_abstract_state(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = _state(3)
  manager = checkpoint.CheckpointManager(tmp_path, async_save=False)
  manager.save(3, state)
  abstract = _abstract(state, lambda x: rows if x.shape[:1] == (8,) else replicated)
  restored = manager.restore(abstract)
  assert_trees_equal(restored, state)
  assert restored.params["kernel"].sharding == rows
  assert len(restored.params["kernel"].addressable_shards) == 8
  assert restored.params["kernel"].addressable_shards[0].data.shape == (1, 4)
  assert restored.params["bias"].sharding == replicated


def _garble_data_files(step_dir):
  for root, _, files in os.walk(step_dir / checkpoint.STATE_ITEM / "d"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"not a checkpoint")


# orbax's failed read of the garbage leaves an asyncio callback behind; it is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["no_commit_marker", "garbage_data"])
def test_corrupt_latest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage):
  manager = checkpoint.CheckpointManager(tmp_path, max_to_keep=3, async_save=False)
  it = _iterator()
  manager.save(1, _state(1), data_iterator=it)
  want_next = next(it)
  manager.save(2, _state(2, scale=3.0), data_iterator=it)
  manager.close()
  if damage == "no_commit_marker":
    (tmp_path / "2" / checkpoint.COMMIT_MARKER).unlink()
  else:
    _garble_data_files(tmp_path / "2")

  fresh = _iterator()
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.CheckpointManager(tmp_path).restore(_abstract(_state(0)), data_iterator=fresh)
  assert_trees_equal(restored, _state(1))
  np.testing.assert_array_equal(next(fresh), want_next)
  messages = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert len(messages) == 1 and str(tmp_path / "2") in messages[0] and "step 1" in messages[0]
  # Moved aside, not deleted; a resumed run can save step 2 again.
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith("2.unreadable-")]
  manager = checkpoint.CheckpointManager(tmp_path, async_save=False)
  assert manager.latest_step() == 1
  assert manager.save(2, _state(2))


def test_no_fallback_when_every_step_fails(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, async_save=False)
  manager.save(1, _state(1))
  manager.save(2, _state(2))
  wrong = _abstract(_state(0).replace(params={"other": jnp.zeros((2,))}))
  with pytest.raises(RuntimeError, match="could be restored") as err:
    manager.restore(wrong)
  message = str(err.value)
  assert "\n" not in message and str(tmp_path) in message and "step 1: " in message and "step 2: " in message
  assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1", "2"]


def test_preemption_flag_is_raised_by_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  try:
    preempted = train_loop.install_preemption_handler()
    assert not preempted(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted(2)
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_load_params_from_a_workdir_takes_the_latest_ema(tmp_path):
  manager = checkpoint.CheckpointManager(checkpoint.checkpoint_dir(tmp_path), async_save=False)
  manager.save(1, _state(1, scale=1.0))
  manager.save(2, _state(2, scale=4.0))
  manager.close()
  expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), _state(0).params)
  loaded = published.load_params_from(tmp_path, expected)
  assert_trees_equal(loaded, jax.tree.map(np.asarray, _state(2, scale=4.0).ema_params))
  assert isinstance(loaded["kernel"], np.ndarray)
