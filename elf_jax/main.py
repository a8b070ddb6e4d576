r"""ELF command line: train, sample, evaluate, distill a few-step student, or compile ahead of time for a TPU topology.

  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny [--mode=sample|eval|distill|compile]

Any config field can be overridden with --config.group.field=value. More examples: docs/running.md#command-line.
"""
import contextlib
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from elf_jax import fs
from elf_jax.config import ConfigError, resolve, validate
from elf_jax.parallel.mesh import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/ (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples (local or gs://); "
                               "default runs/<config name> (configs/owt_b.py -> runs/owt_b, owt.py:l -> runs/owt_l).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "distill", "compile"], "What to do.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (multi-host); default: "
                                 "the ELF_DISTRIBUTED environment variable.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, plus one clear message for an override of a config field that does not exist.

  ml_collections reports `--config.model.nonexistent=1` as a bare AttributeError / KeyError naming only the last
  key, with a traceback; this names the flag and the fix instead and exits with status 1.
  """
  given = argv
  try:
    argv = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError("'key'\nDid you mean ..."))
      detail = detail.args[0]
    detail = str(detail)
    key = re.match(r"\W*(\w+)", detail)
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in overrides if key and key.group(1) in a.split(".")[1:]] or overrides
    sys.exit(f"FATAL Flags parsing error: {', '.join(named)}: no such config field ({' '.join(detail.split())}).\n"
             "Fix the field name: every field is listed, with a comment, in elf_jax/config.py (base_config) and the "
             "resolved config is printed at the start of every run.")
  except Exception as e:  # pylint: disable=broad-except  # the config file raised while loading (syntax, get_config)
    _config_file_error(given, e)
  try:
    _CONFIG.value.keys()  # a missing file fails on first use, not while parsing
  except OSError as e:
    _config_file_error(given, e)
  return argv


def _config_file_error(argv: list[str], error: BaseException) -> None:
  """Exits with one line naming the --config file and what went wrong loading it (its innermost error)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  given = ([a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")] or ["?"])[-1]
  detail = f"{type(error).__name__}: {' '.join(str(error).split())}"
  if isinstance(error, SyntaxError):
    detail = f"SyntaxError: {error.msg} at line {error.lineno}"
  elif not os.path.isfile(given.split(":")[0]):
    detail = "no such file"
  sys.exit(f"FATAL --config={given}: cannot load the config file ({detail}). Pass a "
           "Python file defining get_config(), e.g. --config=configs/tiny.py.")


def default_workdir(config_flag_value: str) -> str:
  """runs/<config file stem>[_<argument>] for `--config=PATH[:ARG]`."""
  path, _, arg = config_flag_value.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{stem}_{arg}" if arg else stem)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax, jax) drown the progress output
    absl_logging.set_verbosity(absl_logging.WARNING)
  initialize_distributed(_DISTRIBUTED.value)
  import jax  # after distributed initialisation

  # The modes take `config` as given, so that presets keep filling only what the user set (e.g. per eval.sweep point);
  # the printed and saved copy holds the values every preset-controlled field resolves to.
  config = _CONFIG.value
  try:
    validate(config)
    resolved = resolve(config)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  print("Resolved config:\n" + resolved.to_json_best_effort(indent=2), flush=True)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  mode = _MODE.value
  if mode == "compile":
    from elf_jax.run import aot
    aot.main(config)
    return
  from elf_jax.report import RunStopped
  from elf_jax.run import distill_loop, experiment, modes, train_loop
  print(f"workdir: {workdir}", flush=True)
  try:
    fs.check_writable(workdir, jax.process_index())
    # Training writes the workdir: one run at a time, the lease taken before the config is written.
    with train_loop.hold_workdir(workdir, config) if mode in ("train", "distill") else contextlib.nullcontext():
      if mode == "train":  # a changed model against the workdir's checkpoints: one line before anything loads
        experiment.check_resume_config(resolved, workdir, f"config_{mode}.json")
      if jax.process_index() == 0:
        (fs.path(workdir) / f"config_{mode}.json").write_text(resolved.to_json_best_effort(indent=2))
      if mode == "train":
        train_loop.train(config, workdir, eval_hook=modes.training_hook)
      elif mode == "sample":
        modes.sample_mode(config, workdir)
      elif mode == "distill":
        distill_loop.distill(config, workdir, eval_hook=modes.training_hook)
      else:
        modes.eval_mode(config, workdir)
  except (ConfigError, FileNotFoundError, RunStopped) as e:  # the message names the problem and the fix
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
