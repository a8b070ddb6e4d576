"""Sharing a run like the official code's `hf_repo_id`: process 0 uploads the workdir's checkpoints and results to a
Hugging Face hub repository after each save and at the end of training (`checkpoint.hf_repo_id`).

What is uploaded (`selection`): the committed checkpoint steps (checkpoints/<step>/ with commit_success.txt), the
saved configs, metrics.jsonl, latent_stats.json, samples/, the plots (*.png) and the TensorBoard events (tb/); not
steps still being written, orbax's temporary folders or the local W&B files. A gs:// workdir is first copied to a
local staging folder. A failed upload is reported in one line and training goes on (as the official code does).
"""
import pathlib
import tempfile

import jax

from elf_jax import fs, report
from elf_jax.weights import published

_RESULT_FILES = ("metrics.jsonl", "latent_stats.json")
_RESULT_FOLDERS = ("samples", "tb")


def selection(workdir: str) -> list[str]:
  """The workdir-relative paths of the files to upload (see the module docstring), sorted."""
  root = fs.path(workdir)
  chosen = []

  def walk(folder):
    for entry in folder.iterdir():
      if entry.is_dir():
        walk(entry)
      else:
        chosen.append(str(entry.relative_to(root)))

  checkpoints = root / published.CHECKPOINT_SUBDIR
  if checkpoints.is_dir():
    for step in checkpoints.iterdir():
      if step.name.isdigit() and (step / published.COMMIT_MARKER).exists():
        walk(step)
  for entry in root.iterdir() if root.is_dir() else []:
    if entry.is_dir() and entry.name in _RESULT_FOLDERS:
      walk(entry)
    elif entry.is_file() and (entry.name in _RESULT_FILES or entry.suffix == ".png"
                              or (entry.name.startswith("config_") and entry.suffix == ".json")):
      chosen.append(entry.name)
  return sorted(chosen)


def stage(workdir: str, files: list[str], destination: pathlib.Path) -> pathlib.Path:
  """Copies `files` (workdir-relative) of a (gs://) workdir into the local folder `destination`; returns it."""
  for name in files:
    target = destination / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((fs.path(workdir) / name).read_bytes())
  return destination


def upload(workdir: str, repo_id: str, reason: str) -> None:
  """Uploads `selection(workdir)` to the hub model repository `repo_id` (created if missing); process 0 only."""
  if jax.process_index() != 0:
    return
  files = selection(workdir)
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    if fs.is_remote(workdir):
      with tempfile.TemporaryDirectory() as staging:
        api.upload_folder(repo_id=repo_id, folder_path=stage(workdir, files, pathlib.Path(staging)),
                          repo_type="model", commit_message=f"elf_jax: {reason}")
    else:
      api.upload_folder(repo_id=repo_id, folder_path=workdir, allow_patterns=files, repo_type="model",
                        commit_message=f"elf_jax: {reason}")
    report.say(f"uploaded {len(files)} files ({reason}) to https://huggingface.co/{repo_id}")
  except Exception as e:  # pylint: disable=broad-except  # offline, no token, no rights: training goes on
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    report.say(f"warning: upload of {reason} to the hub repository checkpoint.hf_repo_id={repo_id!r} failed "
               f"({type(e).__name__}: {detail}); log in with `hf auth login` and check the repository id")
