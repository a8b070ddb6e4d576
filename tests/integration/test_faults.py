"""Nothing lost, nothing silent (issue 21): one test per fault of the issue's table, each asserting the outcome —
what is kept on disk, the one line printed, the exit status.

Fast tests use the real parts in-process (orbax checkpoints, the workdir lease, the fake GCS server); the `slow`
ones run `python -m elf_jax.main` on small overrides of configs/tiny.py (one CPU device, the `cli` fixture's shared
compilation cache: the runs of the same config after the first compile nothing), on a real small tmpfs for the full
disk and as two real processes for two runs on one workdir.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax import fs, report
from elf_jax.config import ConfigError
from elf_jax.objective.state import TrainState
from elf_jax.run import checkpoint
from elf_jax.run import train_loop as loop
from elf_jax.weights import published

from tests.cli_runs import REPO, TINY_CONFIG
from tests.conftest import SMALL

OVERRIDES = [f"--config={TINY_CONFIG}", *(f"--config.{key}={value}" for key, value in SMALL.items()),
             "--config.optim.schedule=constant"]  # as tests/integration/test_gcs.py: the same compiled step


def _state(seed: int) -> TrainState:
  rng = np.random.default_rng(seed)  # random values: compressed chunks stay as large as the data
  params = {"kernel": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "bias": jnp.zeros((64,))}
  return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, ema_params=params, opt_state={},
                    rng=jax.random.PRNGKey(seed))


def _abstract(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _only_line(text: str, needle: str) -> str:
  lines = [line for line in text.splitlines() if needle in line]
  assert len(lines) == 1, text[-3000:]
  return lines[0]


# --- a few bytes flipped in the newest checkpoint -------------------------------------------------------------------

def _flip_bytes(data: bytes) -> bytes:
  middle = len(data) // 2
  return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 3]) + data[middle + 3:]


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("where, damage", [("local", "flip"), ("local", "truncate"), ("gs", "flip")])
def test_flipped_bytes_in_the_newest_step_fall_back_to_the_previous_one(tmp_path, caplog, gcs, where, damage):
  """Without a digest, 3 flipped bytes in an OCDBT data file restore silently with wrong values (orbax's crc covers
  only the shard index), and a truncated one fails deep inside TensorStore; with it, the step is moved aside with one
  warning naming it and the file."""
  directory = str(tmp_path) if where == "local" else f"gs://{gcs.bucket}/flip/{time.time_ns()}"
  manager = checkpoint.CheckpointManager(directory, async_save=True)
  manager.save(1, _state(1))
  manager.save(2, _state(2))
  manager.close()
  step_dir = fs.path(directory) / "2"
  assert (step_dir / checkpoint.DIGEST_FILE).exists()  # written after the commit, off the training thread
  if where == "local":
    target = _largest_data_file(pathlib.Path(str(step_dir)))
    data = target.read_bytes()
    target.write_bytes(_flip_bytes(data) if damage == "flip" else data[:len(data) // 2])
    name = str(target.relative_to(str(step_dir)))
  else:  # a partial / rewritten object: the store's crc32c changes
    import fsspec
    store, root = fsspec.core.url_to_fs(str(step_dir))
    key = max((k for k in store.find(root) if "/d/" in k), key=store.size)
    store.pipe_file(key, _flip_bytes(store.cat_file(key)))
    name = key[len(root) + 1:]

  with caplog.at_level("WARNING"):
    restored = checkpoint.CheckpointManager(directory).restore(_abstract(_state(0)))
  np.testing.assert_array_equal(restored.params["kernel"], _state(1).params["kernel"])
  warning = _only_line("\n".join(r.getMessage() for r in caplog.records), "unusable")
  assert str(step_dir) in warning and name in warning and "corrupted" in warning and "step 1" in warning
  assert [p.name for p in fs.path(directory).iterdir() if p.name.startswith("2.unreadable-")]


# --- the run diverges -----------------------------------------------------------------------------------------------

def test_check_finite_names_the_step_and_the_metric():
  rows = [{"loss": 1.0, "grad_norm": 2.0}, {"loss": 1.5, "grad_norm": float("inf")}, {"loss": np.nan, "grad_norm": 1}]
  with pytest.raises(report.RunStopped) as err:
    loop.check_finite([7, 8, 9], rows, skip_nonfinite=False)
  message = str(err.value)
  assert "\n" not in message and "diverged at step 8 (grad_norm=inf)" in message
  assert "--config.optim.skip_nonfinite=True" in message
  loop.check_finite([7, 8, 9], rows, skip_nonfinite=True)  # skipped on the device: nothing to stop
  assert loop.summarize([{"loss": 1.0, "skipped_nonfinite": 0.0}, {"loss": np.inf, "skipped_nonfinite": 1.0}]) == {
      "loss": 1.0, "skipped_nonfinite": 1.0}


# --- two runs on one workdir ----------------------------------------------------------------------------------------

def test_a_second_lease_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
  with fs.workdir_lease(tmp_path, stale_after_s=3600) as lease:
    with pytest.raises(ConfigError) as err:
      fs.WorkdirLease(tmp_path).take(stale_after_s=3600)  # another run (the same host, a live pid: this one)
    assert "\n" not in str(err.value) and f"pid {os.getpid()}" in str(err.value) and socket.gethostname() in str(
        err.value)
    with fs.workdir_lease(tmp_path, stale_after_s=3600) as nested:  # the loop inside main's block
      assert nested is lease
  assert not (tmp_path / fs.LEASE_FILE).exists()  # released

  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / fs.LEASE_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                    "started": time.time(), "renewed": time.time()}))
  with caplog.at_level("WARNING"), fs.workdir_lease(tmp_path, stale_after_s=3600):
    assert json.loads((tmp_path / fs.LEASE_FILE).read_text())["pid"] == os.getpid()
  assert f"process {dead.pid} no longer runs" in caplog.text

  (tmp_path / fs.LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "renewed": 0}))
  with fs.workdir_lease(tmp_path, stale_after_s=60):  # not renewed for longer than the timeout
    pass


def test_the_lease_on_gcs_is_created_atomically(gcs):
  workdir = f"gs://{gcs.bucket}/leased/{time.time_ns()}"
  first = fs.WorkdirLease(workdir)
  first.take(stale_after_s=3600)
  with pytest.raises(ConfigError, match="is in use by another run"):
    fs.WorkdirLease(workdir).take(stale_after_s=3600)
  first.renew()
  first.release()
  assert not fs.path(workdir, ).joinpath(fs.LEASE_FILE).exists()


# --- metrics after a resume -----------------------------------------------------------------------------------------

def test_rows_of_redone_steps_are_replaced(tmp_path):
  writer = report.MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": float(step)})
  writer.write(4, {"ppl": 1.0}, kind="eval")
  writer.write(0, {"ppl": 2.0}, kind="frontier")
  writer.drop_after(2)  # resumed from step 2: steps 3 and 4 are trained again
  writer.write(3, {"loss": 30.0})
  assert [(r["kind"], r["step"]) for r in report.read_metrics(str(tmp_path))] == [
      ("train", 1), ("train", 2), ("frontier", 0), ("train", 3)]


# --- end to end: python -m elf_jax.main ----------------------------------------------------------------------------

def _main(cli, workdir, *args, cwd=REPO):
  """(exit status, combined output) of one CLI run on the small tiny config."""
  job = cli.start(f"--workdir={workdir}", *OVERRIDES, *args, cwd=cwd, devices=1)
  job.processes[0].wait(timeout=600)
  return job.processes[0].returncode, job.output()


def _last_line(output: str) -> str:
  return output.rstrip().splitlines()[-1]


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving(cli, tmp_path):
  """base_lr=1e9: the gradient norm turns infinite within a few steps; the run stops with one line naming the step,
  and every checkpoint on disk predates it (with optim.skip_nonfinite the run finishes, counting skipped steps)."""
  workdir = tmp_path / "diverged"
  rc, out = _main(cli, workdir, "--config.optim.base_lr=1e9", "--config.checkpoint.every_steps=1")
  assert rc == 1, out[-3000:]
  line = _last_line(out)
  assert line.startswith("error: training diverged at step ") and "skip_nonfinite" in line, out[-3000:]
  bad_step = int(line.split("step ")[1].split()[0])
  assert _steps(workdir) and max(_steps(workdir)) < bad_step
  restored = published.load_params_from(str(workdir), which="raw")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))

  workdir = tmp_path / "skipped"
  rc, out = _main(cli, workdir, "--config.optim.base_lr=1e9", "--config.optim.skip_nonfinite=True")
  assert rc == 0, out[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert sum(r.get("skipped_nonfinite", 0) for r in rows if r["kind"] == "train") >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(published.load_params_from(str(workdir), which="raw")))


@pytest.fixture
def small_tmpfs(tmp_path):
  """A real tmpfs mounted at tmp_path/mnt (needs root); yields its path, unmounted afterwards."""
  mount = tmp_path / "mnt"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save_and_the_rerun_resumes(cli, small_tmpfs):
  """The workdir on a tmpfs with room for one checkpoint: step 3 is saved, step 6 fails: one line naming the step,
  its path and "No space left on device", exit status 1, no shutdown noise; with room again the same command resumes
  from step 3 and finishes."""
  workdir = small_tmpfs / "run"
  args = ("--config.logging.tensorboard=False",)
  rc, out = _main(cli, workdir, *args)
  assert rc == 1, out[-3000:]
  line = _last_line(out)
  assert line.startswith(f"error: saving checkpoint step 6 to {workdir}/checkpoints/6 failed: No space left on device")
  assert "rerun the same command" in line
  assert "Traceback" not in out and "Exception ignored" not in out and "sys.meta_path" not in out, out[-3000:]
  assert _steps(workdir) == [3]

  subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
  rc, out = _main(cli, workdir, *args)
  assert rc == 0, out[-3000:]
  assert "resumed from step 3 of 6" in out and _steps(workdir) == [3, 6]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # the redone steps replaced


@pytest.mark.slow
def test_two_runs_on_one_workdir(cli, tmp_path):
  """A second run started while the first trains stops at once with one line naming the holder and touches
  nothing; the first finishes untouched. Then the finished workdir with a changed model stops with one line naming
  the field, while a longer run (a setting that may change) resumes."""
  workdir = tmp_path / "run"
  first = cli.start(f"--workdir={workdir}", *OVERRIDES, cwd=REPO, devices=1)
  first.wait_for(r"^starting from scratch")
  rc, out = _main(cli, workdir, "--config.seed=1")
  assert rc == 1, out[-3000:]
  assert _last_line(out).startswith(f"error: --workdir='{workdir}' is in use by another run (host "
                                    f"{socket.gethostname()}, pid {first.processes[0].pid}")
  first_out = first.wait()[0]
  assert "train step 6/6" in first_out
  assert json.loads((workdir / "config_train.json").read_text())["seed"] == 0  # the second run wrote nothing
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert not (workdir / fs.LEASE_FILE).exists()

  rc, out = _main(cli, workdir, "--config.model.hidden_size=64")
  assert rc == 1, out[-3000:]
  line = _last_line(out)
  assert line.startswith("error: ") and "model.hidden_size" in line and "32" in line and "64" in line, out[-3000:]
  assert "Exception ignored" not in out and "Traceback" not in out
  assert _steps(workdir) == [3, 6]  # nothing moved aside
