"""Sharing like the official code: what `checkpoint.hf_repo_id` uploads (the upload itself needs the hub, not
reachable here)."""
import huggingface_hub
import huggingface_hub.constants

from elf_jax.run import hub_upload


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
