"""Tracking and sharing like the official code: Weights & Biases logging (read back from an offline run's own
files) and what `checkpoint.hf_repo_id` uploads (the upload itself needs the hub, not reachable here)."""
import json
import time

import huggingface_hub
import huggingface_hub.constants
import pytest

from elf_jax import report
from elf_jax.run import hub_upload

wandb = pytest.importorskip("wandb")

_BLOCK, _HEADER = 32768, 7  # the .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks


def wandb_records(run_file) -> tuple[list[str], list[dict]]:
  """(the record types, the logged rows {key: value}) of an offline W&B run file, parsed from its records."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  data, pos, pending, rows, kinds = run_file.read_bytes(), _HEADER, b"", [], []
  assert data[:4] == b":W&B"
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # a block's zero-padded tail
      pos += left
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    pending += data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      kinds.append(record.WhichOneof("record_type"))
      if kinds[-1] == "history":
        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item})
  return kinds, rows


def wandb_history(run_file, timeout_s: float = 60.0) -> list[dict]:
  """The logged rows of a finished offline run (wandb's writer process may still be flushing the file when
  `finish()` returns on a busy machine: read until its exit record is there)."""
  deadline = time.monotonic() + timeout_s
  kinds, rows = wandb_records(run_file)
  while "exit" not in kinds and time.monotonic() < deadline:
    time.sleep(0.5)
    kinds, rows = wandb_records(run_file)
  assert "exit" in kinds, f"the offline run file holds no exit record after {timeout_s} s: {kinds}"
  return rows


def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = report.MetricsWriter(str(tmp_path), tensorboard=False, wandb_project="elf-test", run_config={"seed": 7})
  writer.write(50, {"loss": 0.5, "lr": 1e-3})
  writer.write(100, {"loss": 0.25, "lr": 2e-3})
  writer.write(0, {"gen_ppl": 31.5, "nan_metric": float("nan")}, kind="eval")
  writer.close()
  (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
  rows = wandb_history(run_file)
  logged = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  assert logged == [{"train/loss": 0.5, "train/lr": 1e-3, "train/step": 50},
                    {"train/loss": 0.25, "train/lr": 2e-3, "train/step": 100},
                    {"eval/gen_ppl": 31.5, "eval/step": 0}]
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [50, 100, 0]  # unchanged


def _workdir(root):
  files = {
      "checkpoints/3/commit_success.txt": "", "checkpoints/3/state/_METADATA": "{}",
      "checkpoints/3/data/process_0.json": "{}",
      "checkpoints/6/state/_METADATA": "{}",  # being written: no commit marker yet
      "checkpoints/6.orbax-checkpoint-tmp-1/state/x": "",
      "config_train.json": "{}", "config_sample.json": "{}", "metrics.jsonl": "{}\n", "latent_stats.json": "{}",
      "samples/step_3.jsonl": "{}\n", "samples/trajectory.html": "<p>", "loss.png": "png", "tb/events.out": "e",
      "wandb/offline-run-1/run-1.wandb": "w", "notes.txt": "mine", "train.log": "log",
  }
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  return root


def test_upload_selection_and_staging(tmp_path):
  workdir = _workdir(tmp_path / "run")
  files = hub_upload.selection(str(workdir))
  assert files == ["checkpoints/3/commit_success.txt", "checkpoints/3/data/process_0.json",
                   "checkpoints/3/state/_METADATA", "config_sample.json", "config_train.json", "latent_stats.json",
                   "loss.png", "metrics.jsonl", "samples/step_3.jsonl", "samples/trajectory.html", "tb/events.out"]
  staged = hub_upload.stage(str(workdir), files, tmp_path / "staging")
  assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == files
  assert (staged / "metrics.jsonl").read_text() == "{}\n"


def test_a_failed_upload_is_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  hub_upload.upload(str(_workdir(tmp_path / "run")), "someone/elf-run", "checkpoint of step 3")
  (line,) = capsys.readouterr().out.strip().splitlines()
  assert line.startswith("warning: upload of checkpoint of step 3 to the hub repository "
                         "checkpoint.hf_repo_id='someone/elf-run' failed (")
