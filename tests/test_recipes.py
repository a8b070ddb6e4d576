"""The shipped recipes equal the reference's training YAMLs (src/configs/training_configs/train_*.yml over the
defaults of src/configs/config.py, docs/method.md#training-recipe), field by field; they name its pre-tokenized Hugging
Face datasets, which the pipeline reads as they are from a local copy."""
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from elf_jax import recipes
from elf_jax.config import base_config, load_config_file, validate
from elf_jax.data import pipeline, sources, synthetic
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.objective import optim
from elf_jax.run import experiment

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
HUB = "embedded-language-flows/"

# The offline demos: their own settings (no official recipe to equal), built from the synthetic language.
OFFLINE_DEMOS = ("tiny", "tiny_cond", "tiny_distill")
# Every setting the reference's YAMLs (or its Config defaults they rely on) fix, as our config field -> value.
COMMON = {
    "seed": 42,
    # Encoder and latents: the authors' T5-small pickle by hub path (C = 512), latent_mean 0, latent_std 0.2;
    # tokenizer = the encoder's.
    "encoder.name_or_path": HUB + "t5_small_encoder_jax/t5_small_encoder_jax.pkl", "encoder.dim": 512,
    "encoder.latent_mean": 0.0, "encoder.latent_std": 0.2,
    "encoder.measure_latent_stats": False, "data.tokenizer": "t5-small", "model.vocab_size": 32100,
    # Network: bottleneck 128, 4 time / self-cond-guidance / mode tokens, MLP ratio 4, no dropout.
    "model.bottleneck_dim": 128, "model.num_time_tokens": 4, "model.num_guidance_tokens": 4,
    "model.num_mode_tokens": 4, "model.mlp_ratio": 4.0, "model.dropout_rate": 0.0,
    # Denoiser objective.
    "flow.P_mean": -1.5, "flow.P_std": 0.8, "flow.denoiser_noise_scale": 2.0, "flow.t_eps": 0.05,
    "flow.time_schedule": "logit_normal",
    # Decoder objective (its noise scale differs per task, below).
    "flow.decoder_prob": 0.2, "flow.decoder_m_mean": 0.8, "flow.decoder_m_std": 0.8,
    # Self-conditioning and its guidance scale range.
    "flow.self_cond_prob": 0.5, "flow.guidance_min": 0.5, "flow.guidance_max": 5.0,
    # Optimisation: Muon, blr 1e-3 at batch 512, no weight decay, constant after warm-up, EMA 0.9999, clip 1.0;
    # the run length is counted in epochs.
    "optim.optimizer": "muon", "optim.base_lr": 1e-3, "optim.global_batch_size": 512, "optim.weight_decay": 0.0,
    "optim.schedule": "constant", "optim.grad_accum_steps": 1, "optim.grad_clip": 1.0, "optim.ema_decay": 0.9999,
    "optim.num_steps": -1,
    # Data: the pre-tokenized datasets, read with `datasets`.
    "data.source": "hf_arrow", "data.packing": False,
}
UNCONDITIONAL = {
    **COMMON, "data.conditional": False, "data.text_key": "input_ids", "data.max_length": 1024,
    "flow.pad_token": "pad", "flow.decoder_noise_scale": 5.0, "flow.label_drop_prob": 0.0,
    "sample.preset": "owt_sde32", "sample.num_samples": 1000, "eval.gpt2": "gpt2-large",
}
CONDITIONAL = {
    **COMMON, "data.conditional": True, "data.input_key": "condition_input_ids", "data.output_key": "input_ids",
    "flow.pad_token": "eos", "flow.decoder_noise_scale": 1.0, "flow.label_drop_prob": 0.1,
    "optim.num_epochs": 100.0, "sample.preset": "cond_ode64",
}
OFFICIAL = {
    "owt_b": {**UNCONDITIONAL, "model.depth": 12, "model.hidden_size": 768, "model.num_heads": 12,
              "optim.num_epochs": 5.0},
    "owt_m": {**UNCONDITIONAL, "model.depth": 24, "model.hidden_size": 1056, "model.num_heads": 16,
              "optim.num_epochs": 4.0},
    "owt_l": {**UNCONDITIONAL, "model.depth": 32, "model.hidden_size": 1280, "model.num_heads": 16,
              "optim.num_epochs": 3.0},
    "xsum_b": {**CONDITIONAL, "model.depth": 12, "model.hidden_size": 768, "model.num_heads": 12,
               "data.max_length": 1088, "data.max_condition_length": 1024, "sample.num_samples": 100},
    "wmt_de_en_b": {**CONDITIONAL, "model.depth": 12, "model.hidden_size": 768, "model.num_heads": 12,
                    "data.max_length": 128, "data.max_condition_length": 64, "sample.num_samples": 5000},
}
# The datasets (data_path, eval_data_path) of each recipe: data.path with "{split}" = data.split / data.eval_split.
DATASETS = {
    "owt_b": (HUB + "openwebtext-t5", None),
    "owt_m": (HUB + "openwebtext-t5", None),
    "owt_l": (HUB + "openwebtext-t5", None),
    "xsum_b": (HUB + "xsum_train_t5", HUB + "xsum_validation_t5"),
    "wmt_de_en_b": (HUB + "wmt14_de-en_train_t5", HUB + "wmt14_de-en_validation_t5"),
}
# Warm-up in optimizer steps: 0.5 epoch (OpenWebText), 5000 steps (XSum, WMT14).
WARMUP = {"owt_b": 0.5, "owt_m": 0.5, "owt_l": 0.5, "xsum_b": 5000, "wmt_de_en_b": 5000}


def load_config(name: str):
  """configs/<name>.py loaded by path, as --config does."""
  return load_config_file(CONFIGS / f"{name}.py")


def test_every_shipped_recipe_has_a_table():
  shipped = {p.stem for p in CONFIGS.glob("*.py")}
  assert shipped == set(OFFICIAL) | set(OFFLINE_DEMOS)


@pytest.mark.parametrize("name", OFFLINE_DEMOS)
def test_offline_demo_builds_its_data_without_a_download(name):
  """A valid config whose tokenizer fills the model head exactly and whose first batch builds offline; the
  conditional demo's batch holds [source ; target] rows and its tokenizer knows the words of both languages."""
  config = load_config(name)
  validate(config)
  tok, language = experiment.load_tokenizer(config)
  assert len(tok) == config.model.vocab_size
  config.optim.global_batch_size = 8
  batch = next(iter(pipeline.make_dataset(config, tok, config.data.split, language=language)))
  assert batch["ids"].shape == (8, config.data.max_length) and tok.unk_token_id not in batch["ids"]
  assert batch["cond_mask"].any(axis=1).all() == config.data.conditional
  if config.data.conditional:
    words = synthetic.SyntheticTranslation(language.vocabulary).vocabulary
    assert tok.convert_tokens_to_ids(words) == list(range(3, 3 + len(words)))


def test_configs_import_their_recipe_from_the_package():
  """Configs share recipes through `elf_jax.recipes`, never by editing sys.path to import one another."""
  for path in CONFIGS.glob("*.py"):
    text = path.read_text()
    assert "sys.path" not in text and "from elf_jax import recipes" in text, path.name


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_equals_the_official_yaml(name):
  config = load_config(name)
  validate(config)
  actual = {field: config[field.split(".")[0]][field.split(".")[1]] if "." in field else config[field]
            for field in OFFICIAL[name]}
  wrong = {field: (actual[field], value) for field, value in OFFICIAL[name].items() if actual[field] != value}
  assert not wrong, f"configs/{name}.py differs from the official recipe (field: (ours, official)): {wrong}"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_warmup(name):
  config = load_config(name)
  for steps_per_epoch in (1000, 38034):
    expected = int(round(WARMUP[name] * steps_per_epoch)) if WARMUP[name] < 1 else WARMUP[name]
    assert optim.warmup_steps(config.optim, steps_per_epoch) == expected


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_names_the_official_datasets(name):
  data = load_config(name).data
  train, evaluation = DATASETS[name]
  assert data.path.replace("{split}", data.split) == train
  if evaluation is not None:
    assert data.path.replace("{split}", data.eval_split) == evaluation
  else:
    assert "{split}" not in data.path  # one dataset, no evaluation split (unconditional evaluation samples)


@pytest.mark.parametrize("name", ["owt_b", "xsum_b", "wmt_de_en_b"])
def test_recipe_reads_a_local_copy_of_the_official_dataset(name, tmp_path):
  """The recipe unchanged but for data.path (a local copy, as offline), the reference's columns read as they are:
  rows are [condition[:max_input_length] ; target] cut to S, padded per the recipe, steps per epoch from the length."""
  datasets = pytest.importorskip("datasets")
  config = load_config(name)
  d = config.data
  s, kept = d.max_length, d.max_condition_length
  rng = np.random.default_rng(0)
  rows = {"input_ids": [rng.integers(2, 9, n).tolist() for n in (3, s, 1, s // 2)]}
  if d.conditional:
    rows["condition_input_ids"] = [rng.integers(10, 20, n).tolist() for n in (kept + 7, 2, kept, 0)]
  for split in (d.split, d.eval_split):
    local = tmp_path / pathlib.PurePosixPath(d.path.replace("{split}", split)).name
    if not local.exists():
      datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(local))
  d.path = str(tmp_path / pathlib.PurePosixPath(d.path).name)
  config.optim.global_batch_size = 4
  assert len(sources.make_source(d, d.split)) // config.optim.global_batch_size == 1  # steps per epoch
  tok = tokenizer_lib.build_word_tokenizer(["word"])  # T5's pad (0) and EOS (1) ids; the rows are ids already
  batch = next(iter(pipeline.make_dataset(config, tok, d.eval_split, shuffle=False)))
  pad = 1 if config.flow.pad_token == "eos" else 0
  for i in range(4):
    condition = rows["condition_input_ids"][i][:kept] if d.conditional else []
    tokens = (condition + rows["input_ids"][i])[:s]
    assert batch["ids"][i].tolist() == tokens + [pad] * (s - len(tokens))
    assert batch["valid"][i].sum() == len(tokens) and batch["cond_mask"][i].sum() == len(condition)


class _Recording:
  """A config (or group) that records, per recipe function, the assignments that leave a field as it was."""

  def __init__(self, config, redundant, prefix=""):
    object.__setattr__(self, "_config", config)
    object.__setattr__(self, "_redundant", redundant)
    object.__setattr__(self, "_prefix", prefix)

  def __getattr__(self, name):
    value = getattr(self._config, name)
    if isinstance(value, ml_collections.ConfigDict):
      return _Recording(value, self._redundant, f"{self._prefix}{name}.")
    return value

  def __setattr__(self, name, value):
    if getattr(self._config, name) == value:
      self._redundant.setdefault(sys._getframe(1).f_code.co_name, []).append(self._prefix + name)
    setattr(self._config, name, value)


def test_recipes_set_only_what_differs_from_the_base(monkeypatch):
  """Every assignment in a recipe changes the value it had (base_config's, or the recipe it builds on): a recipe
  reads as its differences. A table-driven assignment (owt's sizes) counts as redundant only if it is for every
  argument."""
  calls = {"owt": [("b",), ("m",), ("l",)], "xsum": [()], "wmt_de_en": [()], "tiny": [()], "tiny_distill": [()]}
  redundant = {}
  for name, arguments in calls.items():
    per_call = []
    for args in arguments:
      records = {}
      monkeypatch.setattr(recipes, "base_config", lambda: _Recording(base_config(), records))
      getattr(recipes, name)(*args)
      per_call.append(set(records.get(name, [])))
    redundant[name] = sorted(set.intersection(*per_call))
  assert not any(redundant.values()), f"recipe assignments equal to the value already there: {redundant}"
