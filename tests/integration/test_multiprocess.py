"""Multi-process runs on one machine (issue 13, items 2-4): 2 processes x 4 CPU devices form one 8-device mesh
(jax.distributed over the CLI's ELF_* variables, gloo collectives), with the workdir in a local fake GCS bucket as
on a TPU pod (tests/conftest.py `gcs`, tests/cli_runs.py).

One chain of 2-process jobs on one workdir serves every test:
  1. killed: trains from scratch and is SIGKILLed once step 3 is committed (during step 3's sampling hook);
  2. preempted: resumes from step 3; process 1 alone gets SIGTERM before the first step (while it compiles); both
     processes save the step they agree on (4) and exit 0;
  3. finished: resumes from that step, trains to step 6, samples and scores (the final hook);
  4. --mode=sample and 5. --mode=eval on the finished workdir.
The reference is the same config trained straight through in this process, on its 8 devices.
"""
import json
import re
import signal
import time

import jax
import numpy as np
import pytest

from elf_jax import fs
from elf_jax.data import pipeline, sources
from elf_jax.data import tokenizer as tokenizers_
from elf_jax.eval import gen_ppl
from elf_jax.run import checkpoint, modes, train_loop
from elf_jax.weights import published

from tests.cli_runs import TINY_CONFIG
from tests.conftest import SMALL, small_config

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

PROCESSES, DEVICES = 2, 4
# All 8 devices on the fsdp axis: params, EMA and optimizer state are sharded across the two processes, and so is
# the batch (data x fsdp). A sampling hook at step 3 too: the window in which job 1 is killed.
MULTI = {"mesh.data": 1, "mesh.fsdp": 8, "logging.sample_every_steps": 3}
OVERRIDES = [f"--config={TINY_CONFIG}", *(f"--config.{key}={value}" for key, value in {**SMALL, **MULTI}.items())]
NUM_STEPS = SMALL["optim.num_steps"]


def _rel_frobenius(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _texts(path) -> list[str]:
  return [json.loads(line)["text"] for line in fs.path(path).read_text().splitlines()]


def _metric_rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (fs.path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_global_batches_do_not_depend_on_the_process_count():
  """Process p's batches are rows [p·b, (p+1)·b) of the single-process global batches, across an epoch boundary."""
  config = small_config()
  language = sources.make_language(config.data)
  tok = tokenizers_.load_tokenizer(config.data.tokenizer, language)
  make = lambda p, count: iter(pipeline.make_dataset(config, tok, config.data.split, language=language,
                                                     process_index=p, process_count=count, batch_size=8))
  single, parts = make(0, 1), [make(p, PROCESSES) for p in range(PROCESSES)]
  per_epoch = config.data.synthetic_num_sentences // 8
  for _ in range(per_epoch + 2):
    whole, pieces = next(single), [next(part) for part in parts]
    for key, value in whole.items():
      np.testing.assert_array_equal(np.concatenate([piece[key] for piece in pieces]), value, err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same config trained straight through in this process on 8 devices: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("reference")
  state = train_loop.train(small_config(**MULTI), str(workdir), eval_hook=modes.training_hook)
  return workdir, state


@pytest.fixture(scope="module")
def chain(cli, gcs, tmp_path_factory):
  """Runs jobs 1-5 of the module docstring on gs://bucket/multi; returns what the tests look at."""
  cwd = tmp_path_factory.mktemp("cwd")
  workdir = f"gs://{gcs.bucket}/multi"
  args = (f"--workdir={workdir}", *OVERRIDES)
  run = dict(cwd=cwd, processes=PROCESSES, devices=DEVICES)
  ckpt = checkpoint.checkpoint_dir(workdir)
  found = {}

  killed = cli.start(*args, **run)
  killed.wait_for("^workdir: ", 0)
  while not (ckpt / "3" / checkpoint.COMMIT_MARKER).exists():
    assert all(p.poll() is None for p in killed.processes), killed.output(0)[-5000:]
    time.sleep(0.05)
  killed.kill()
  found["after_kill"] = sorted(p.name for p in ckpt.iterdir())
  found["killed"] = [killed.output(i) for i in range(PROCESSES)]

  preempted = cli.start(*args, **run)
  preempted.wait_for("^resumed from step 3 ", 0)  # the first step is registered with the preemption service
  preempted.signal(signal.SIGTERM, 1)
  found["preempted"] = preempted.wait()
  found["after_preemption"] = sorted(p.name for p in ckpt.iterdir())

  found["finished"] = cli.run(*args, **run)
  found["sampled"] = cli.run(*args, "--mode=sample", **run)
  found["evaluated"] = cli.run(*args, "--mode=eval", **run)
  return workdir, found


def test_two_processes_train_like_one(reference, chain):
  """Per-step losses and final params / EMA of the 2-process chain equal the straight single-process run."""
  ref_dir, ref_state = reference
  workdir, _ = chain
  ref_rows = {r["step"]: r for r in _metric_rows(ref_dir) if r["kind"] == "train"}
  rows = [r for r in _metric_rows(workdir) if r["kind"] == "train"]
  assert sorted(r["step"] for r in rows) == list(range(1, NUM_STEPS + 1))  # each step logged once across the jobs
  for r in rows:
    assert r["loss"] == pytest.approx(ref_rows[r["step"]]["loss"], rel=1e-5), r["step"]
  final = checkpoint.checkpoint_dir(workdir) / str(NUM_STEPS) / checkpoint.STATE_ITEM
  for which, want in (("raw", ref_state.params), ("ema", ref_state.ema_params)):
    got = _leaves(published.load_published_elf(final, which, expected=want))
    errors = {path: _rel_frobenius(got[path], value) for path, value in _leaves(jax.device_get(want)).items()}
    assert max(errors.values()) <= 1e-5, (which, errors)


def test_a_killed_run_resumes_from_its_last_checkpoint(chain):
  _, found = chain
  assert found["after_kill"] == ["3"]  # killed after step 3's save, before step 6
  assert "resumed from step 3 of 6" in found["preempted"][0]


def test_sigterm_to_one_process_stops_both_at_the_same_step(chain):
  """Process 1 alone was signalled; both stopped at the step they agreed on, saved it together and exited 0."""
  workdir, found = chain
  saved = int(re.search(r"SIGTERM received: saved step (\d+)", found["preempted"][0]).group(1))
  assert 3 < saved < NUM_STEPS
  assert found["after_preemption"] == ["3", str(saved)]
  # Saved by both processes: the state (one orbax checkpoint) and each process's data-iterator position.
  step_dir = checkpoint.checkpoint_dir(workdir) / str(saved)
  assert (step_dir / checkpoint.COMMIT_MARKER).exists()
  positions = sorted(p.name for p in (step_dir / checkpoint.DATA_ITEM).iterdir() if p.name.startswith("process_"))
  assert positions == [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)]
  assert f"resumed from step {saved} of 6" in found["finished"][0]


def test_every_process_samples_and_process_0_writes_each_file_once(reference, chain, gcs):
  ref_dir, _ = reference
  workdir, found = chain
  # The final hook sampled over the whole 8-device mesh: the same texts as the single-process run.
  assert _texts(f"{workdir}/samples/step_6.jsonl") == _texts(ref_dir / "samples" / "step_6.jsonl")
  assert "Samples at step 6" in found["finished"][0] and "Samples at step" not in found["finished"][1]
  evals = [r["step"] for r in _metric_rows(workdir) if r["kind"] == "eval"]
  assert evals.count(NUM_STEPS) == 1
  uploads = gcs.uploads("multi/")
  singles = ["config_train.json", "latent_stats.json", "loss_curve.png", "samples/step_6.jsonl",
             "samples/step_6.txt"]
  # config_train.json: once per job of the chain's 3 training jobs; the rest once.
  assert {name: uploads.get(f"multi/{name}") for name in singles} == {**{name: 1 for name in singles},
                                                                     "config_train.json": 3}


def test_sample_and_eval_modes_on_two_processes(chain, gcs):
  workdir, found = chain
  final_texts = _texts(f"{workdir}/samples/step_6.jsonl")
  path = re.search(r"wrote 8 samples to (\S+\.jsonl)", found["sampled"][0]).group(1)
  assert _texts(path) == final_texts  # EMA params of step 6, the same seed: the final hook's samples
  assert "wrote 8 samples" not in found["sampled"][1]
  assert _texts(f"{workdir}/samples/eval_seed0.jsonl") == final_texts
  (summary,) = [r for r in _metric_rows(workdir) if r["kind"] == "eval" and "num_seeds" in r]
  assert summary["num_seeds"] == 1 and np.isfinite(summary["gen_ppl"])
  uploads = gcs.uploads("multi/samples/")
  assert uploads[path.removeprefix(f"gs://{gcs.bucket}/")] == 1 and uploads["multi/samples/eval_seed0.jsonl"] == 1


def test_gpt2_scoring_on_two_processes_equals_one(cli, tmp_path):
  """Gen. PPL with the batch split over data x fsdp of a mesh spanning both processes, as --mode=eval scores OWT."""
  from tests.eval.conftest import MAX_LENGTH, TEXTS, build_tiny_gpt2  # pylint: disable=import-outside-toplevel  (torch)
  directory = build_tiny_gpt2(tmp_path / "gpt2").directory
  want = gen_ppl.GenPPLScorer.from_pretrained(str(directory), batch_size=8, max_length=MAX_LENGTH).score(TEXTS)
  outputs = cli.run(str(directory), str(MAX_LENGTH), json.dumps(TEXTS), cwd=tmp_path, processes=PROCESSES,
                    devices=DEVICES, module="tests.gpt2_scoring_worker")
  for output in outputs:
    got = json.loads(re.search(r"^scores: (.*)$", output, re.M).group(1))
    assert got["num_tokens"] == want["num_tokens"] and got["num_samples"] == want["num_samples"]
    for key in ("gen_ppl", "entropy", "nll"):
      assert got[key] == pytest.approx(want[key], rel=1e-6), key
