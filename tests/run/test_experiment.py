"""Tests for elf_jax.run.experiment: the steps-per-epoch rule."""
import pytest

from elf_jax import config as config_lib
from elf_jax.config import ConfigError
from elf_jax.data import sources
from elf_jax.run import experiment


def test_steps_per_epoch_come_from_the_dataset(tmp_path):
  """len(train split) // global_batch_size (partial batch dropped), read from a real source; too little data is an
  error naming the field."""
  config = config_lib.base_config()
  config.optim.global_batch_size = 8
  assert experiment.steps_per_epoch(config, 1000) == 125 and experiment.steps_per_epoch(config, 1007) == 125
  config.optim.num_epochs = 2.5
  assert experiment.total_steps(config, 125) == 312  # round(2.5 * 125)
  config.optim.num_steps = 7
  assert experiment.total_steps(config, 125) == 7

  (tmp_path / "train.txt").write_text("".join(f"sentence {i}\n" for i in range(37)))
  config.data.source, config.data.path = "text", str(tmp_path / "{split}.txt")
  assert experiment.steps_per_epoch(config, len(sources.make_source(config.data, config.data.split))) == 37 // 8
  config.optim.global_batch_size = 64
  with pytest.raises(ConfigError, match="optim.global_batch_size=64"):
    experiment.steps_per_epoch(config, len(sources.make_source(config.data, config.data.split)))
