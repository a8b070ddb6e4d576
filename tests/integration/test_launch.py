"""Tests for launch/tpu_vm.sh and launch/gpu.sh against a fake `gcloud` that records its arguments."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU_VM = REPO / "launch" / "tpu_vm.sh"
GPU = REPO / "launch" / "gpu.sh"

# Appends its argv (JSON, one call per line) to $FAKE_GCLOUD_LOG. `describe` prints the n-th entry of
# $FAKE_GCLOUD_STATES (comma-separated; the last one repeats); `scp` keeps a copy of the file it was given (if any);
# any call whose argv contains $FAKE_GCLOUD_FAIL exits 1.
_FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  with open(log) as f:
    n = sum("describe" in json.loads(line) for line in f)
  states = os.environ.get("FAKE_GCLOUD_STATES", "ACTIVE").split(",")
  print(states[min(n, len(states)) - 1])
if "scp" in args and os.path.exists(args[args.index("scp") + 1]):
  shutil.copy(args[args.index("scp") + 1], log + ".scp")
if os.environ.get("FAKE_GCLOUD_FAIL") and os.environ["FAKE_GCLOUD_FAIL"] in " ".join(args):
  sys.exit(1)
"""

COMMON = ["--name=elf-b", "--zone=us-east5-a", "--project=my-proj"]
GC = ["--zone=us-east5-a", "--project=my-proj"]
WORKDIR = "gs://bucket/elf-b"
OVERRIDES = ["--config.optim.num_steps=10", "--config.data.path=/data/my corpus"]
RUN_ARGS = ["--config=configs/owt_b.py", f"--workdir={WORKDIR}", "--", *OVERRIDES]


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  """Puts the fake gcloud first on PATH; returns a function giving the recorded calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  fake.chmod(0o755)
  log = tmp_path / "gcloud.log"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
  monkeypatch.delenv("FAKE_GCLOUD_FAIL", raising=False)
  monkeypatch.delenv("FAKE_GCLOUD_STATES", raising=False)
  return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _run(script, *args, check=True):
  result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _verb(call):
  """The gcloud verb of a recorded call: create, describe, scp, ssh, delete."""
  return call[3]


def _remote_script(call):
  """The shell script an ssh call runs on the workers; checks it reaches every worker of the slice."""
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "elf-b"] and call[-2:] == GC
  assert "--worker=all" in call
  (command,) = [a[len("--command="):] for a in call if a.startswith("--command=")]
  return command


def _main_argv(script):
  """Environment assignments and arguments of the `python -m elf_jax.main` call in a remote script."""
  line = next(ln for ln in re.split(r"\n|&&|\{ nohup", script) if "elf_jax.main" in ln)
  words = shlex.split(re.split(r" 2>&1| >>", line)[0])
  env = [w for w in words if re.fullmatch(r"[A-Z_]+=.*", w)]
  return env, words[words.index("elf_jax.main") + 1:]


def _check_run(calls, workdir=WORKDIR, overrides=tuple(OVERRIDES)):
  """Exactly one ssh starts main on every worker, with ELF_DISTRIBUTED=1, the config, the workdir, the overrides."""
  runs = [c for c in calls if _verb(c) == "ssh" and "elf_jax.main" in " ".join(c)]
  assert len(runs) == 1
  env, argv = _main_argv(_remote_script(runs[0]))
  assert "ELF_DISTRIBUTED=1" in env
  assert argv == ["--config=configs/owt_b.py", f"--workdir={workdir}", *overrides]


def _check_setup(calls):
  """The code reaches every worker and each installs the package with the `tpu` extra (jax[tpu] + gcsfs)."""
  ssh = [c for c in calls if _verb(c) == "ssh" and "pip install" in " ".join(c)]
  assert len(ssh) == 1
  assert 'pip install -e ".[tpu]"' in _remote_script(ssh[0])


def test_create_requests_the_slice(gcloud):
  _run(TPU_VM, "create", *COMMON)
  create, describe = gcloud()
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "elf-b"]
  assert {"--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", *GC} <= set(create)
  assert _verb(describe) == "describe"


def test_create_waits_for_active(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_GCLOUD_STATES", "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
  result = _run(TPU_VM, "create", *COMMON, "--poll-seconds=1")
  assert [_verb(c) for c in gcloud()] == ["create"] + ["describe"] * 3
  assert "WAITING_FOR_RESOURCES" in result.stderr and "is ACTIVE" in result.stderr


def test_create_failed_queued_resource(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_GCLOUD_STATES", "FAILED")
  result = _run(TPU_VM, "create", *COMMON, check=False)
  assert result.returncode == 1
  assert "queued resource elf-b is FAILED" in result.stderr


def test_create_options(gcloud):
  _run(TPU_VM, "create", "--name=elf-l", "--accelerator-type", "v5p-128", "--runtime-version=v2-alpha-tpuv5-x",
       "--reserved", "--no-queue")
  (create,) = gcloud()
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "elf-l"]
  assert {"--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5-x", "--reserved"} <= set(create)
  _run(TPU_VM, "create", *COMMON, "--spot")
  assert "--spot" in gcloud()[1]


def test_setup_copies_working_tree_to_every_worker(gcloud, tmp_path):
  _run(TPU_VM, "setup", *COMMON)
  calls = gcloud()
  (scp,) = [c for c in calls if _verb(c) == "scp"]
  assert "--worker=all" in scp and not os.path.exists(scp[4])  # a temporary archive, cleaned up
  _check_setup(calls)
  with tarfile.open(str(tmp_path / "gcloud.log") + ".scp") as tar:
    names = set(tar.getnames())
  assert {"setup.py", "launch/tpu_vm.sh", "elf_jax/parallel/mesh.py"} <= names
  assert not any(n.startswith(".git/") or "__pycache__" in n or n.endswith(".egg-info") for n in names)


def test_setup_from_repo(gcloud):
  _run(TPU_VM, "setup", *COMMON, "--repo=https://github.com/me/elf_jax.git", "--branch=dev")
  calls = gcloud()
  assert [_verb(c) for c in calls] == ["ssh"]
  script = _remote_script(calls[0])
  assert "git clone https://github.com/me/elf_jax.git" in script and "origin/dev" in script
  _check_setup(calls)


def test_run_passes_config_workdir_and_overrides(gcloud):
  _run(TPU_VM, "run", *COMMON, *RUN_ARGS)
  _check_run(gcloud())


def test_run_overrides_without_separator_and_detach(gcloud):
  result = _run(TPU_VM, "run", "--name=elf-b", *GC, "--config", "configs/owt_b.py", "--workdir=/tmp/w",
                "--config.seed=3", "--detach")
  _check_run(gcloud(), workdir="/tmp/w", overrides=["--config.seed=3"])
  assert "nohup" in _remote_script(gcloud()[0])
  assert "is not gs://" in result.stderr  # every host must write to the same place


def test_logs_and_delete(gcloud):
  _run(TPU_VM, "logs", *COMMON, "--worker=2")
  _run(TPU_VM, "delete", *COMMON)
  logs, delete = gcloud()
  assert "--worker=2" in logs and "elf_run.log" in " ".join(logs)
  assert _verb(delete) == "delete" and "elf-b" in delete


def test_all_creates_sets_up_runs_and_deletes(gcloud):
  _run(TPU_VM, "all", *COMMON, *RUN_ARGS)
  calls = gcloud()
  assert _verb(calls[0]) == "create" and _verb(calls[-1]) == "delete"
  _check_setup(calls)
  _check_run(calls)


def test_all_deletes_after_a_failed_run(gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_GCLOUD_FAIL", "elf_jax.main")
  result = _run(TPU_VM, "all", *COMMON, *RUN_ARGS, check=False)
  assert result.returncode == 1
  assert _verb(gcloud()[-1]) == "delete"


def test_dry_run_shows_workdir_install_and_calls_nothing(gcloud):
  printed = _run(TPU_VM, "--dry-run", "all", *COMMON, *RUN_ARGS).stdout
  assert gcloud() == []
  assert f"--workdir={WORKDIR}" in printed and 'pip install -e ".[tpu]"' in printed


@pytest.mark.parametrize("command", ["create", "setup", "run", "logs", "delete", "all"])
def test_dry_run_prints_the_commands_a_real_run_makes(gcloud, tmp_path, command):
  args = [command, *COMMON, *RUN_ARGS]
  printed = _run(TPU_VM, "--dry-run", *args).stdout
  # Executing the printed text as a shell script makes the gcloud calls of a real run (temporary archive aside).
  subprocess.run(["bash", "-c", printed], check=True, timeout=60)
  replayed = gcloud()
  (tmp_path / "gcloud.log").unlink()
  _run(TPU_VM, *args)
  no_archive = lambda calls: [[a for a in c if not a.endswith("elf_jax.tar.gz") or ":" in a] for c in calls]
  assert replayed and no_archive(replayed) == no_archive(gcloud())


def test_help(gcloud):
  result = _run(TPU_VM, "--help")
  assert result.stdout.startswith("Usage: launch/tpu_vm.sh COMMAND")
  assert gcloud() == []


@pytest.mark.parametrize("args, message", [
    ([], "no command given"),
    (["frobnicate"], "unknown argument: frobnicate"),
    (["create", "delete"], "two commands given"),
    (["create", "--bogus"], "unknown argument: --bogus"),
    (["create", "--zone"], "--zone needs a value"),
    (["create", "--spot", "--reserved"], "--spot and --reserved exclude each other"),
    (["create", "--name=Elf_B"], "--name=Elf_B: use lower-case"),
    (["create", "--poll-seconds=0"], "--poll-seconds=0 must be a positive integer"),
    (["run", "--workdir=gs://b/x"], "run needs --config=PATH"),
    (["run", "--config=c.py"], "run needs --workdir=DIR"),
    (["all", "--config=c.py", "--workdir=gs://b", "--detach"], "--detach would delete it"),
    (["setup", "--branch=dev"], "--branch needs --repo=URL"),
    (["logs", "--worker=x"], "--worker=x must be a worker index or all"),
])
def test_tpu_vm_bad_arguments(gcloud, args, message):
  result = _run(TPU_VM, "--name=elf-b", *args, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert gcloud() == []


def test_gpu_single_node_dry_run():
  result = _run(GPU, "--config=configs/owt_b.py", "--workdir", "/data/elf b", "--dry-run", "--",
                "--config.optim.num_steps=5")
  assert shlex.split(result.stdout) == ["ELF_DISTRIBUTED=0", "python3", "-m", "elf_jax.main",
                                        "--config=configs/owt_b.py", "--workdir=/data/elf b",
                                        "--config.optim.num_steps=5"]


def test_gpu_multi_node_dry_run():
  result = _run(GPU, "--config=configs/owt_b.py", "--workdir=/shared/w", "--coordinator=10.0.0.1:12345",
                "--num-processes", "4", "--process-id=3", "--config.mesh.fsdp=8", "--python=/venv/bin/python",
                "--dry-run")
  assert result.stdout.strip() == (
      "ELF_DISTRIBUTED=1 ELF_COORDINATOR_ADDRESS=10.0.0.1:12345 ELF_NUM_PROCESSES=4 ELF_PROCESS_ID=3 "
      "/venv/bin/python -m elf_jax.main --config=configs/owt_b.py --workdir=/shared/w --config.mesh.fsdp=8")


def test_gpu_runs_the_command_with_the_environment(tmp_path):
  """Without --dry-run the script execs the command: a stand-in interpreter reports its env and argv."""
  fake_python = tmp_path / "python"
  fake_python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                         "print(json.dumps([os.environ.get(k) for k in ('ELF_DISTRIBUTED', 'ELF_COORDINATOR_ADDRESS',"
                         " 'ELF_NUM_PROCESSES', 'ELF_PROCESS_ID')] + sys.argv[1:]))\n")
  fake_python.chmod(0o755)
  result = _run(GPU, "--config=c.py", "--workdir=w", "--coordinator=h:1", "--num-processes=2", "--process-id=0",
                f"--python={fake_python}")
  assert json.loads(result.stdout) == ["1", "h:1", "2", "0", "-m", "elf_jax.main", "--config=c.py", "--workdir=w"]


@pytest.mark.parametrize("args, message", [
    (["--workdir=w"], "--config=PATH is required"),
    (["--config=c.py"], "--workdir=DIR is required"),
    (["--config=c.py", "--workdir=w", "--num-processes=2"], "need all of --coordinator, --num-processes"),
    (["--config=c.py", "--workdir=w", "--coordinator=h", "--num-processes=2", "--process-id=0"], "must be host:port"),
    (["--config=c.py", "--workdir=w", "--coordinator=h:1", "--num-processes=0", "--process-id=0"],
     "--num-processes=0 must be a positive integer"),
    (["--config=c.py", "--workdir=w", "--coordinator=h:1", "--num-processes=2", "--process-id=2"],
     "--process-id=2 must be an integer in 0 .. 1"),
    (["--config=c.py", "--workdir=w", "--coordinator=h:1", "--num-processes=2", "--process-id=08"],
     "--process-id=08 must be an integer"),
    (["--config=c.py", "--workdir=w", "--gpus=8"], "unknown argument: --gpus"),
    (["--config"], "--config needs a value"),
])
def test_gpu_bad_arguments(args, message):
  result = _run(GPU, "--dry-run", *args, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ""


def test_gpu_help():
  assert re.match(r"Usage: launch/gpu.sh --config=PATH --workdir=DIR", _run(GPU, "-h").stdout)
