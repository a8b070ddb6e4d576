"""Tracking like the official code: Weights & Biases logging (read back from an offline run's own files); what
`checkpoint.hf_repo_id` uploads: tests/run/test_hub_upload.py."""
import json
import time

import pytest

from elf_jax import report

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
