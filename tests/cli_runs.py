"""`python -m elf_jax.main` in subprocesses for end-to-end tests: one process, or N processes forming one
jax.distributed job on this machine (each with its own CPU devices; collectives over gloo) through ELF_DISTRIBUTED,
ELF_COORDINATOR_ADDRESS, ELF_NUM_PROCESSES and ELF_PROCESS_ID, as launch/tpu_vm.sh starts them on TPU hosts.

Output goes to one log file per process (read while the job runs: `wait_for`). Single-process jobs share a
persistent compilation cache, so the runs after the first reuse the compiled train step and sampler. Multi-process
jobs compile afresh: on CPU jax's cache key differs between the processes and only process 0 writes the cache, so
process 0 would start each collective 30+ s before process 1 and gloo's 30 s rendezvous would time out.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """Running processes of one CLI invocation; process i's combined stdout/stderr is in `logs[i]`."""

  def __init__(self, processes: list[subprocess.Popen], logs: list[pathlib.Path]):
    self.processes, self.logs = processes, logs

  def output(self, i: int = 0) -> str:
    return self.logs[i].read_text(errors="replace")

  def wait_for(self, pattern: str, i: int = 0, timeout_s: float = 300) -> re.Match:
    """Blocks until process i's output matches `pattern` (re.M); fails if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while True:
      match = re.search(pattern, self.output(i), re.M)
      if match:
        return match
      if self.processes[i].poll() is not None or time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"process {i} never printed {pattern!r}:\n{self.output(i)[-5000:]}")
      time.sleep(0.05)

  def signal(self, sig: int, i: int) -> None:
    self.processes[i].send_signal(sig)

  def kill(self) -> None:
    for p in self.processes:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.processes:
      p.wait()

  def wait(self, timeout_s: float = 600) -> list[str]:
    """Waits for every process; returns their outputs. Fails (with the output) on a non-zero exit status."""
    try:
      for p in self.processes:
        p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError("timed out:\n" + "\n".join(self.output(i)[-3000:] for i in range(len(self.logs))))
    outputs = [self.output(i) for i in range(len(self.logs))]
    for i, (p, out) in enumerate(zip(self.processes, outputs)):
      assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-6000:]}"
    return outputs


class Runner:
  """Starts jobs of `python -m elf_jax.main ARGS` (or another module) in `cwd`, sharing one compilation cache.

  Args:
    log_dir: where the per-process logs go (a fresh file per process and job).
    compile_cache: the persistent compilation cache directory shared by the single-process jobs.
    env: extra environment (e.g. the fake GCS server's), added to this process's.
  """

  def __init__(self, log_dir: pathlib.Path, compile_cache: pathlib.Path, env: dict[str, str] | None = None):
    self.log_dir, self.compile_cache, self.env = log_dir, compile_cache, dict(env or {})
    self._jobs = 0

  def start(self, *args: str, cwd: pathlib.Path, processes: int = 1, devices: int = 8,
            module: str = "elf_jax.main") -> Job:
    """`processes` processes of `python -m module ARGS` with `devices` CPU devices each; more than one form a
    jax.distributed job (the module calls `elf_jax.parallel.mesh.initialize_distributed`)."""
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, **self.env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()}
    if processes == 1:
      env.update(JAX_COMPILATION_CACHE_DIR=str(self.compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    else:
      env.pop("JAX_COMPILATION_CACHE_DIR", None)
      env.update(ELF_DISTRIBUTED="1", ELF_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                 ELF_NUM_PROCESSES=str(processes))
    self._jobs += 1
    command = [sys.executable, "-m", module, *args]
    started, logs = [], []
    for i in range(processes):
      logs.append(self.log_dir / f"job{self._jobs}_process{i}.log")
      with open(logs[-1], "w") as log:
        started.append(subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                        env={**env, "ELF_PROCESS_ID": str(i)} if processes > 1 else env))
    return Job(started, logs)

  def run(self, *args: str, cwd: pathlib.Path, processes: int = 1, devices: int = 8, module: str = "elf_jax.main",
          timeout_s: float = 600) -> list[str]:
    """Runs a job to the end; returns the outputs of its processes (fails on a non-zero exit status)."""
    return self.start(*args, cwd=cwd, processes=processes, devices=devices, module=module).wait(timeout_s)
