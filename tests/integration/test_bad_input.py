"""Bad input gets one clear error, naming the field and the fix, before anything is compiled (issue 4, item 9).

"Before anything is compiled": `jax.jit` is replaced by a function that fails the test, and the run must leave no
checkpoint directory and no metrics behind.
"""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from elf_jax.config import ConfigError, base_config, validate
from elf_jax.data import tokenizer as tokenizers
from elf_jax.run import train_loop

from tests.conftest import REPO, small_config


@pytest.fixture
def no_jit(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("jax.jit was called before the bad input was reported")

  monkeypatch.setattr(jax, "jit", refuse)


def train_error(workdir, exception=ValueError, **overrides) -> str:
  """Runs loop.train on small_config(**overrides); returns the message of the `exception` it must raise."""
  with pytest.raises(exception) as err:
    train_loop.train(small_config(**overrides), str(workdir))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  return str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    ({"optim.base_lr": 0.0}, ["optim.base_lr=0.0 must be > 0"]),
    ({"optim.base_lr": -1e-3}, ["optim.base_lr=-0.001 must be > 0"]),
    ({"flow.decoder_prob": 1.5}, ["flow.decoder_prob=1.5 must be in [0, 1]"]),
    ({"flow.decoder_prob": -0.1}, ["flow.decoder_prob=-0.1 must be in [0, 1]"]),
    ({"data.conditional": True, "data.max_length": 16, "data.max_condition_length": 16},
     ["data.max_length=16 must be longer than data.max_condition_length=16"]),
    ({"data.conditional": True, "data.max_length": 16, "data.max_condition_length": 20},
     ["data.max_length=16 must be longer than data.max_condition_length=20"]),
    ({"eval.mbr_candidates": 0}, ["eval.mbr_candidates=0 must be >= 1"]),
    ({"eval.mbr_candidates": 4}, ["eval.mbr_candidates=4 is for conditional tasks",
                                  "--config.eval.mbr_candidates=1"]),
    ({"eval.mbr_metric": "meteor"}, ["eval.mbr_metric='meteor': expected one of bleu, rougeL"]),
])
def test_bad_values_fail_validation(tmp_path, no_jit, overrides, expected):
  message = train_error(tmp_path, ConfigError, **overrides)
  assert message.startswith("invalid config: ") and "\n" not in message  # exactly one problem: one line
  for text in expected:
    assert text in message


def test_mauve_without_its_package_names_the_install(monkeypatch):
  """eval.mauve on data scored by GPT-2 needs the optional mauve-text: said before anything runs, with both fixes."""
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mauve" else find_spec(name, *a))
  config = base_config()
  config.data.source = "text"
  with pytest.raises(ConfigError, match=r"pip install 'elf_jax\[mauve\]' \(or set --config.eval.mauve=False\)"):
    validate(config)
  config.eval.mauve = False
  validate(config)
  config.eval.mauve, config.data.source = True, "synthetic"  # no GPT-2 scoring: nothing to install
  validate(config)


def test_every_bad_value_is_listed_in_one_error(tmp_path, no_jit):
  message = train_error(tmp_path, ConfigError, **{"optim.base_lr": 0.0, "flow.decoder_prob": 2.0})
  assert "optim.base_lr" in message and "flow.decoder_prob" in message


def test_batch_not_divisible_by_the_data_parallel_size(tmp_path, no_jit):
  message = train_error(tmp_path, **{"optim.global_batch_size": 12})  # 8 CPU devices -> 8 batch shards
  assert "per-step batch 12" in message and "8 batch shards" in message
  assert "--config.mesh.data/fsdp/tensor" in message


def test_decoder_groups_not_fitting_the_mesh(tmp_path, no_jit):
  message = train_error(tmp_path, **{"flow.decoder_groups": 4})
  assert "flow.decoder_groups=4" in message and "--config.flow.decoder_groups=-1" in message


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory):
  """A saved 5-word tokenizer (8 tokens with pad, EOS, unknown), loadable through config.data.tokenizer."""
  path = tmp_path_factory.mktemp("tokenizer")
  tokenizers.build_word_tokenizer(["the", "cat", "sat", "on", "mat"], save_dir=str(path))
  return str(path)


@pytest.mark.parametrize("source, name", [("jsonl", "train.jsonl"), ("text", "train.txt"), ("hf_arrow", "arrow")])
def test_missing_data_path(tmp_path, no_jit, word_tokenizer_dir, source, name):
  path = str(tmp_path / "no_such_dir" / name)
  message = train_error(tmp_path / "run", FileNotFoundError, **{"data.source": source, "data.path": path,
                                                                 "data.tokenizer": word_tokenizer_dir})
  assert f"config.data.path = {path!r}" in message and "does not exist" in message
  assert f"set config.data.path to your {source} data" in message


def test_tokenizer_larger_than_the_model_head(tmp_path, no_jit):
  tokens = small_config().model.vocab_size  # the tiny config's head fits its word tokenizer exactly
  message = train_error(tmp_path, ConfigError, **{"model.vocab_size": tokens - 1})
  assert f"has {tokens} tokens" in message and f"model.vocab_size={tokens - 1}" in message
  assert f"--config.model.vocab_size={tokens}" in message


def test_tokenizer_larger_than_the_encoder_vocabulary(tmp_path, no_jit):
  """A local Hugging Face T5 encoder with fewer embeddings than the tiny config's word tokenizer has tokens."""
  import transformers  # only this test needs torch
  tokens = small_config().model.vocab_size
  encoder_dir = tmp_path / "t5"
  t5 = transformers.T5Config(vocab_size=tokens - 8, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
  transformers.T5EncoderModel(t5).save_pretrained(encoder_dir)
  message = train_error(tmp_path / "run", ConfigError, **{"encoder.name_or_path": str(encoder_dir)})
  assert f"has {tokens} tokens" in message and f"encoder {str(encoder_dir)!r} embeds only {tokens - 8}" in message
  assert "--config.data.tokenizer" in message


@pytest.mark.parametrize("blocked", ["file_as_parent", "file_as_workdir"])
def test_workdir_not_writable(tmp_path, no_jit, blocked):
  # Tests run as root, which chmod does not stop: a regular file in the way blocks everyone.
  (tmp_path / "a_file").write_text("not a directory")
  workdir = tmp_path / "a_file" / "run" if blocked == "file_as_parent" else tmp_path / "a_file"
  with pytest.raises(ConfigError, match=f"--workdir='{workdir}' is not writable .*pass a directory you can write to"):
    train_loop.train(small_config(), str(workdir))


@pytest.mark.parametrize("override, hint", [("--config.model.nonexistent=1", "('nonexistent')"),
                                            ("--config.model.depht=2", 'Did you mean "depth" instead of "depht"?')])
def test_unknown_config_field_on_the_command_line(tmp_path, override, hint):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "elf_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}", override],
      cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  flag = override.split("=")[0]
  assert f"FATAL Flags parsing error: {flag}: no such config field" in result.stderr
  assert hint in result.stderr and "elf_jax/config.py" in result.stderr
  assert "Traceback" not in result.stderr  # one message, not a stack
  assert not workdir.exists()  # stopped while parsing flags, before anything ran


def test_cosine_schedule_shorter_than_its_warm_up(tmp_path):
  message = train_error(tmp_path, ConfigError, **{"optim.schedule": "cosine", "optim.warmup_steps": 6})
  assert "\n" not in message and "needs more optimizer steps (6) than warm-up steps (6)" in message
  assert "--config.optim.warmup_steps" in message


def _main_error(tmp_path, *args) -> str:
  """The stderr of a CLI run that must stop with status 1 before any workdir is made."""
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "elf_jax.main", f"--workdir={workdir}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and not workdir.exists()
  return result.stderr


@pytest.mark.parametrize("content, cause", [(None, "(no such file)"),
                                            ("def get_config(:\n", "(SyntaxError: invalid syntax at line 1)"),
                                            ("def get_config():\n  return 1 / 0\n", "(ZeroDivisionError: division")])
def test_a_missing_or_broken_config_file(tmp_path, content, cause):
  path = tmp_path / "config.py"
  if content is not None:
    path.write_text(content)
  stderr = _main_error(tmp_path, f"--config={path}")
  assert stderr.strip().splitlines() == [stderr.strip()]  # one line, no traceback
  assert stderr.startswith(f"FATAL --config={path}: cannot load the config file {cause}")
  assert "--config=configs/tiny.py" in stderr
