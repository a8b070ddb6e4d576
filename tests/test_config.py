"""Each default lives in one place, `elf_jax.config.base_config()`: the static dataclasses built from a config carry
no default of their own for a value the config holds, and `from_config` reads every such value from it."""
import ast
import dataclasses
import pathlib

import pytest

from elf_jax.config import base_config, resolve
from elf_jax.model.elf import ModelConfig
from elf_jax.objective.distill import DistillConfig
from elf_jax.objective.flow import FlowConfig
from elf_jax.sampling import sampler as S

# Per dataclass: the config groups its fields come from; the only fields allowed a default (no config counterpart:
# derived from others); and the fields computed from the config (or the round) or given by the caller (the
# tokenizer's ids) rather than copied from one key.
CASES = {
    ModelConfig: (("model", "encoder"), {"mlp_hidden"}, set()),
    FlowConfig: (("flow",), set(), set()),
    S.SampleConfig: (("sample", "flow"), set(), {"max_target_length", "eos_id", "pad_id"}),
    DistillConfig: (("distill",), {"span_fallback"}, {"student_steps", "teacher_sub_steps"}),
}
# Fields named differently from their config counterpart: field -> (group, key).
RENAMED = {"latent_dim": ("encoder", "dim"), "noise_scale": ("flow", "denoiser_noise_scale"),
           "return_trajectory": ("sample", "save_trajectory")}


def _build(cls, config, **overrides):
  if cls is DistillConfig:
    return cls.from_config(config, 16, 4, **overrides)
  if cls is S.SampleConfig:
    return cls.from_config(config, eos_id=1, pad_id=0, **overrides)
  return cls.from_config(config, **overrides)


def _has_default(field: dataclasses.Field) -> bool:
  return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_no_default_outside_config_py(cls):
  """A field with a default must be one the config does not hold; every other field is required."""
  groups, allowed, _ = CASES[cls]
  config = base_config()
  config_keys = {key for group in groups for key in config[group]}
  with_default = {f.name for f in dataclasses.fields(cls) if _has_default(f)}
  assert with_default <= allowed, (
      f"{cls.__name__} fields {sorted(with_default - allowed)} have a default; defaults live only in "
      "elf_jax/config.py::base_config() — remove it and build the dataclass with from_config")
  assert not allowed & (config_keys | set(RENAMED)), f"{sorted(allowed & config_keys)} are config fields"


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_from_config_reads_every_config_value(cls):
  """Built from base_config(), each field equals the value of the same name (or its renamed counterpart) in the
  resolved config (presets filled in); keyword overrides replace single fields and leave the others."""
  groups, allowed, derived = CASES[cls]
  config = resolve(base_config())
  built = _build(cls, base_config())
  for field in dataclasses.fields(cls):
    if field.name in allowed | derived:
      continue
    group, key = RENAMED.get(field.name, (None, field.name))
    source = [g for g in ([group] if group else groups) if key in config[g]]
    assert source, f"{cls.__name__}.{field.name} has no counterpart in config.{'/'.join(groups)}"
    assert getattr(built, field.name) == config[source[0]][key], (cls.__name__, field.name)
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  name = next(f.name for f in dataclasses.fields(cls) if f.name not in derived and number(getattr(built, f.name)))
  changed = _build(cls, config, **{name: getattr(built, name) + 1})
  assert changed == dataclasses.replace(built, **{name: getattr(built, name) + 1})


# Keyword defaults equal to base_config's value of the same-named field that remain, with why. The train step's
# `conditional` is False for unconditional data (folded into the shared objective core, issue 20 item 4); a checkpoint
# manager opened only to restore needs no retention policy.
KNOWN_DEFAULTS = {("elf_jax/objective/step.py", "ElfObjective", "conditional"),
                  ("elf_jax/objective/distill.py", "DistillObjective", "conditional"),
                  ("elf_jax/objective/loss.py", "draw_noise", "conditional"),
                  ("elf_jax/run/checkpoint.py", "__init__", "max_to_keep"),
                  ("elf_jax/run/checkpoint.py", "__init__", "async_save")}


def _defaults(tree: ast.AST):
  """(owner, name, default expression) of every keyword default and dataclass-style field default in `tree`."""
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      args = node.args
      positional = args.posonlyargs + args.args
      pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
      pairs += [(arg, value) for arg, value in zip(args.kwonlyargs, args.kw_defaults) if value is not None]
      yield from ((node.name, arg.arg, value) for arg, value in pairs)
    elif isinstance(node, ast.ClassDef):
      for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and statement.value is not None and isinstance(
            statement.target, ast.Name):
          yield node.name, statement.target.id, statement.value


def test_no_code_default_repeats_a_config_value():
  """No function or dataclass in elf_jax/ defaults a parameter to base_config's value of a field of the same name
  (e.g. LatentEncoder's latent_mean / latent_std, the sampler's EOS / pad ids, GenPPLScorer's batch_size): the value
  comes from the config (None = "not given" is allowed)."""
  values = {}
  for group, content in base_config().items():
    for key, value in (content.items() if hasattr(content, "items") else [(group, content)]):
      values.setdefault(key, []).append(value)
  values.update(eos_id=[1], pad_id=[0])  # the ids of T5 (and of the word tokenizer): the tokenizer gives them
  root = pathlib.Path(__file__).resolve().parents[1]
  found = set()
  for path in sorted((root / "elf_jax").rglob("*.py")):
    for owner, name, default in _defaults(ast.parse(path.read_text())):
      try:
        value = ast.literal_eval(default)
      except ValueError:
        continue
      if value is not None and name in values and any(value == v and type(value) is type(v) for v in values[name]):
        found.add((path.relative_to(root).as_posix(), owner, name))
  assert found <= KNOWN_DEFAULTS, f"defaults repeating config values (take them from config): {found - KNOWN_DEFAULTS}"
  assert KNOWN_DEFAULTS <= found, f"fixed, drop from KNOWN_DEFAULTS: {KNOWN_DEFAULTS - found}"
