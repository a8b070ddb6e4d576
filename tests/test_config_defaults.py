"""Each default lives in one place, `elf_jax.config.base_config()`: the static dataclasses built from a config carry
no default of their own for a value the config holds, and `from_config` reads every such value from it."""
import dataclasses
import inspect

import pytest

from elf_jax.config import base_config
from elf_jax.model.elf import ModelConfig
from elf_jax.objective.distill import DistillConfig
from elf_jax.objective.flow import FlowConfig
from elf_jax.sampling import sampler as S

# Per dataclass: the config groups its fields come from; the only fields allowed a default (no config counterpart:
# given by the tokenizer or derived from others); and the fields computed from the config (or the round) rather
# than copied from one key.
CASES = {
    ModelConfig: (("model", "encoder"), {"mlp_hidden"}, set()),
    FlowConfig: (("flow",), set(), set()),
    S.SampleConfig: (("sample", "flow"), {"eos_id", "pad_id"}, {"max_target_length"}),
    DistillConfig: (("distill",), {"span_fallback"}, {"student_steps", "teacher_sub_steps"}),
}
# Fields named differently from their config counterpart: field -> (group, key).
RENAMED = {"latent_dim": ("encoder", "dim"), "noise_scale": ("flow", "denoiser_noise_scale"),
           "return_trajectory": ("sample", "save_trajectory")}


def _build(cls, config, **overrides):
  if cls is DistillConfig:
    return cls.from_config(config, 16, 4, **overrides)
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
  """Built from base_config(), each field equals the config value of the same name (or its renamed counterpart);
  keyword overrides replace single fields and leave the others."""
  groups, allowed, derived = CASES[cls]
  config = base_config()
  built = _build(cls, config)
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


def test_sampler_function_has_no_config_defaults():
  """`sample.sample` takes the config-held settings without defaults (they come from a SampleConfig)."""
  config = base_config()
  config_keys = {key for group in ("sample", "flow") for key in config[group]} | {"noise_scale"}
  params = inspect.signature(S.sample).parameters
  defaulted = {name for name, p in params.items() if p.default is not inspect.Parameter.empty}
  assert not defaulted & config_keys, f"sample.sample() has defaults for config fields {sorted(defaulted & config_keys)}"
