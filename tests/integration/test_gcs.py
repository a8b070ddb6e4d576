"""gs:// end to end against a local fake-gcs-server (issue 13, item 1).

A training run with --workdir=gs://bucket/run (small overrides of configs/tiny.py, one CPU device) writes the
config, metrics, latent statistics, samples, loss plot, TensorBoard events and checkpoints to the bucket and
nothing to local disk; a second run resumes from the bucket's checkpoint. A latent cache and a JSONL corpus are
written to and read from the bucket like local ones.
"""
import json

import numpy as np
import pytest

from elf_jax import fs
from elf_jax.data import latent_cache, sources
from elf_jax.run import cache_latents

from tests.cli_runs import TINY_CONFIG
from tests.conftest import SMALL, small_config

pytestmark = pytest.mark.slow  # end-to-end runs and equivalence checks: the full suite, not the fast loop

# A constant learning rate: the 3-step and the 6-step run compile the same train step (the compilation cache serves
# the second run).
OVERRIDES = [f"--config={TINY_CONFIG}", *(f"--config.{key}={value}" for key, value in SMALL.items()),
             "--config.optim.schedule=constant"]


@pytest.fixture(scope="module")
def gcs_runs(cli, gcs, tmp_path_factory):
  """3 steps, then the same command with 6 steps: (local cwd of both runs, workdir URL, outputs)."""
  cwd = tmp_path_factory.mktemp("cwd")
  workdir = f"gs://{gcs.bucket}/run"
  first = cli.run(f"--workdir={workdir}", *OVERRIDES, "--config.optim.num_steps=3", cwd=cwd, devices=1)[0]
  second = cli.run(f"--workdir={workdir}", *OVERRIDES, cwd=cwd, devices=1)[0]
  return cwd, workdir, first, second


def _rows(run, kind):
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["kind"] == kind]


def test_a_run_writes_everything_to_the_bucket_and_nothing_locally(gcs_runs, gcs):
  cwd, workdir, first, _ = gcs_runs
  assert "starting from scratch: 3 optimizer steps" in first
  assert list(cwd.iterdir()) == []  # no local folder named gs: (nor anything else)
  run = fs.path(workdir)
  assert json.loads((run / "config_train.json").read_text())["optim"]["num_steps"] == 6  # the second run's
  assert set(json.loads((run / "latent_stats.json").read_text())) == {"mean", "std"}
  assert (run / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
  for step in (3, 6):
    texts = [json.loads(line)["text"] for line in (run / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
    assert len(texts) == SMALL["sample.num_samples"]
    assert (run / "samples" / f"step_{step}.txt").read_text().splitlines() == texts
  assert [r["step"] for r in _rows(run, "eval")] == [3, 6]
  # Files written once per run: the statistics by the first run only, each sample file once.
  uploads = gcs.uploads("run/")
  assert uploads["run/latent_stats.json"] == 1 and uploads["run/config_train.json"] == 2
  assert all(uploads[f"run/samples/step_{s}.{ext}"] == 1 for s in (3, 6) for ext in ("jsonl", "txt"))


def test_a_second_run_resumes_from_the_bucket(gcs_runs):
  _, workdir, first, second = gcs_runs
  assert "measured latent stats" in first and "measured latent stats" not in second  # read back from the bucket
  assert f"resumed from step 3 of 6 ({workdir}/checkpoints)" in second
  run = fs.path(workdir)
  assert [r["step"] for r in _rows(run, "train")] == [1, 2, 3, 4, 5, 6]  # appended across runs, nothing lost
  steps = sorted(p.name for p in (run / "checkpoints").iterdir())
  assert steps == ["3", "6"] and all((run / "checkpoints" / s / "commit_success.txt").exists() for s in steps)


def test_latent_cache_and_corpus_in_the_bucket_read_like_local_ones(gcs, tmp_path):
  config = small_config(**{"data.synthetic_num_sentences": 64, "encoder.measure_latent_stats": False})
  remote = f"gs://{gcs.bucket}/latents"
  kwargs = dict(max_rows=24, batch_size=8, rows_per_shard=16)
  assert cache_latents.build_cache(config, remote, **kwargs) == cache_latents.build_cache(config, tmp_path, **kwargs)
  local_rows, remote_rows = latent_cache.CachedRows(str(tmp_path)), latent_cache.CachedRows(remote)
  assert len(remote_rows) == 24 and len(remote_rows.index["shards"]) == 2
  for i in (0, 15, 16, 23):  # both shards, their first and last rows
    for key, value in local_rows[i].items():
      np.testing.assert_array_equal(remote_rows[i][key], value, err_msg=key)

  lines = [json.dumps({"text": f"sentence {i}"}) for i in range(5)]
  fs.path(f"gs://{gcs.bucket}/corpus/train.jsonl").write_text("\n".join(lines) + "\n")
  config.data.source, config.data.path = "jsonl", f"gs://{gcs.bucket}/corpus/{{split}}.jsonl"
  source = sources.make_source(config.data, "train")
  assert [source[i]["text"] for i in range(len(source))] == [f"sentence {i}" for i in range(5)]
