"""The training loop end to end (issue 4, items 5-6): exact resume, SIGTERM, a half-written latest checkpoint, and
the files a person reads (metrics.jsonl, TensorBoard events, loss_curve.png, samples).

Every run uses `small_config()` (configs/tiny.py shrunk to seconds per run) on the 8 CPU devices of conftest.py.
The reference is one straight 6-step run, shared by the tests; the others interrupt and resume and must reproduce
its per-step losses and final params / EMA bit for bit.
"""
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from elf_jax.data import pipeline, sources
from elf_jax.objective import optim
from elf_jax.run import checkpoint, experiment, modes, train_loop

from tests.conftest import small_config

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

def train_rows(workdir) -> list[dict]:
  """The `kind == "train"` rows of DIR/metrics.jsonl, in file order."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
  return [r for r in rows if r["kind"] == "train"]


def steps_on_disk(workdir) -> list[str]:
  return sorted(p.name for p in checkpoint.checkpoint_dir(str(workdir)).iterdir())


def assert_same_tree(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def read_tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """Scalars of every event file in `tb_dir`: tag -> [(step, value)], read from the TFRecord framing directly."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    data = open(os.path.join(tb_dir, name), "rb").read()
    pos = 0
    while pos < len(data):  # record: uint64 length, uint32 crc, payload, uint32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The reference: 6 uninterrupted steps (checkpoints at 3 and 6) with the sampling + evaluation hook at the end."""
  workdir = tmp_path_factory.mktemp("straight")
  state = train_loop.train(small_config(), str(workdir), eval_hook=modes.training_hook)
  return workdir, state


def test_straight_run_writes_what_a_person_reads(straight):
  workdir, state = straight
  assert int(state.step) == 6
  assert steps_on_disk(workdir) == ["3", "6"]

  config = small_config()  # the config the run trained with
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # log_every_steps = 1
  for r in rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["step_time_s"] > 0
  # The lr logged at step N is the one update N used: the schedule after N − 1 updates (0 for the first).
  schedule = optim.make_schedule(config.optim, steps_per_epoch=1, total_steps=6)  # warmup_steps given
  np.testing.assert_allclose([r["lr"] for r in rows], [float(schedule(n - 1)) for n in range(1, 7)], rtol=1e-6)
  assert rows[0]["lr"] == 0 and rows[-1]["lr"] > 0
  evals = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eval"' in line]
  assert len(evals) == 1 and evals[0]["step"] == 6
  assert {"gen_ppl", "entropy", "true_gen_ppl", "true_entropy"} <= set(evals[0])
  assert evals[0]["true_gen_ppl"] > 1 and evals[0]["gen_ppl"] > 1

  tb = read_tensorboard_scalars(workdir / "tb")  # the same numbers as metrics.jsonl
  assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in tb["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)
  assert tb["eval/gen_ppl"][0][0] == 6

  png = (workdir / "loss_curve.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

  records = [json.loads(line) for line in open(workdir / "samples" / "step_6.jsonl")]
  texts = [r["text"] for r in records]
  assert len(records) == 8 and all(len(r["ids"]) == config.data.max_length for r in records)
  assert (workdir / "samples" / "step_6.txt").read_text().splitlines() == texts
  vocabulary = set(sources.make_language(config.data).vocabulary)
  assert all(set(t.split()) <= vocabulary for t in texts)  # decoded words of the language, specials removed


def test_sample_mode_opens_no_training_data(straight, tmp_path, monkeypatch):
  """--mode=sample builds the experiment without a training plan: the training split is never opened (no source,
  no pipeline, no latent-statistics measurement) and the latent statistics are the run's saved latent_stats.json;
  training (the plan and `train_loop.measure_latent_stats`, as --mode=train) opens it (so the check can fail)."""
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  (workdir / experiment.LATENT_STATS_FILE).unlink(missing_ok=True)
  config = small_config(**{"encoder.measure_latent_stats": True})
  opened = []
  make_source, make_dataset = sources.make_source, pipeline.make_dataset
  monkeypatch.setattr(sources, "make_source", lambda data, split, *a, **k: opened.append(split) or make_source(
      data, split, *a, **k))
  monkeypatch.setattr(pipeline, "make_dataset", lambda c, tok, split, **k: opened.append(split) or make_dataset(
      c, tok, split, **k))
  modes.sample_mode(config, str(workdir))  # no statistics saved: unconditional sampling does not need them
  (workdir / experiment.LATENT_STATS_FILE).write_text(json.dumps({"mean": 0.125, "std": 0.5}))

  path = modes.sample_mode(config, str(workdir))
  assert config.data.split not in opened
  assert len(open(path).read().splitlines()) == config.sample.num_samples
  exp = experiment.build(config, str(workdir))
  assert exp.training_plan is None and (exp.encoder.latent_mean, exp.encoder.latent_std) == (0.125, 0.5)
  train_loop.measure_latent_stats(experiment.build(config, str(workdir), with_training_plan=True), str(workdir))
  assert config.data.split in opened

def _send_sigterm_after_step_2(setup, workdir, state, step, writer, final):
  """A training hook standing in for the cluster's preemption notice."""
  del setup, workdir, state, writer, final
  if step == 2:
    os.kill(os.getpid(), signal.SIGTERM)


# Checkpoints every 5 steps, so step 3 is saved only because of the signal (sent by the hook after step 2).
PREEMPTED = {"checkpoint.every_steps": 5, "logging.sample_every_steps": 2}


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """A run stopped by SIGTERM after step 2; what it left, recorded before any test changes the workdir."""
  workdir = tmp_path_factory.mktemp("preempted")
  handler_before = signal.getsignal(signal.SIGTERM)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    state = train_loop.train(small_config(**PREEMPTED), str(workdir), eval_hook=_send_sigterm_after_step_2)
  return {"workdir": workdir, "step": int(state.step), "stdout": out.getvalue(),
          "steps_on_disk": steps_on_disk(workdir),
          "handler_restored": signal.getsignal(signal.SIGTERM) == handler_before,
          "loss_curve": (workdir / "loss_curve.png").exists(), "rows": train_rows(workdir)}


def test_sigterm_saves_then_exits(preempted):
  assert preempted["step"] == 3 and preempted["steps_on_disk"] == ["3"]
  assert "SIGTERM received: saved step 3" in preempted["stdout"]
  assert [r["step"] for r in preempted["rows"]] == [1, 2, 3]
  assert not preempted["loss_curve"]  # it stopped early: no end-of-run artefacts
  assert preempted["handler_restored"]  # the loop puts the previous SIGTERM handler back


def test_the_step_sigterm_saved_is_logged_between_log_windows(tmp_path, capsys):
  """Logging every 2 steps, SIGTERM after step 2 saves step 3: its row is written (averaging step 3 alone), so the
  curve has no gap at the resume point."""
  state = train_loop.train(small_config(**PREEMPTED, **{"logging.log_every_steps": 2}), str(tmp_path),
                           eval_hook=_send_sigterm_after_step_2)
  assert int(state.step) == 3 and "SIGTERM received: saved step 3" in capsys.readouterr().out
  assert [r["step"] for r in train_rows(tmp_path)] == [2, 3]


def _half_write(step_dir: pathlib.Path):
  """What a save killed midway leaves: no commit markers, truncated data files."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if name == checkpoint.COMMIT_MARKER:
        os.remove(path)
      elif os.path.getsize(path) > 16:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_resume_past_a_half_written_checkpoint_is_exact(straight, preempted, caplog, capsys):
  """3 steps, SIGTERM, a half-written later step 5, restart: resumes at 3 and matches the straight run exactly."""
  ref_dir, ref_state = straight
  workdir = preempted["workdir"]
  ckpt = workdir / "checkpoints"
  shutil.copytree(ref_dir / "checkpoints" / "6", ckpt / "5")
  _half_write(ckpt / "5")
  leftover = sorted(p.relative_to(ckpt / "5") for p in (ckpt / "5").rglob("*"))

  with caplog.at_level("WARNING"):
    state = train_loop.train(small_config(**PREEMPTED), str(workdir), eval_hook=_send_sigterm_after_step_2)
  assert "resumed from step 3 of 6" in capsys.readouterr().out
  messages = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert len(messages) == 1 and str(ckpt / "5") in messages[0] and "step 3" in messages[0]
  # The broken step was moved aside with everything in it (nothing is deleted); steps 5 and 6 were saved anew
  # (and step 3 dropped: tiny keeps the newest 2).
  aside = [p for p in ckpt.iterdir() if p.name.startswith("5.unreadable-")]
  assert len(aside) == 1 and sorted(p.relative_to(aside[0]) for p in aside[0].rglob("*")) == leftover
  assert steps_on_disk(workdir) == sorted(["5", "6", aside[0].name])

  # Data position, RNG and schedule all resumed: the same per-step losses and final state as without interruption.
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in rows] == [r["loss"] for r in train_rows(ref_dir)]
  assert int(state.step) == 6
  assert_same_tree(state.params, ref_state.params)
  assert_same_tree(state.ema_params, ref_state.ema_params)
  assert_same_tree(state.opt_state, ref_state.opt_state)


def test_init_from_a_relative_workdir_trains(straight, tmp_path, monkeypatch):
  """`init_from` names a finished run's workdir relative to the cwd; params and EMA start equal (own buffers: the
  step donates both) and training proceeds."""
  source, _ = straight
  monkeypatch.chdir(source.parent)
  config = small_config(**{"optim.num_steps": 3})
  config.init_from = source.name
  state = train_loop.train(config, str(tmp_path))
  assert int(state.step) == 3
  assert all(np.isfinite(r["loss"]) for r in train_rows(tmp_path))
