"""The Python API: `elf_jax.load(id_or_path, config=None, **overrides)` → a `Model` to call in a notebook
(`generate`, `complete`, `condition`, `score`, `trajectory`).

Examples and where the task settings come from: docs/running.md#python-api.
"""
from collections.abc import Callable, Mapping, Sequence
import copy
import dataclasses
import json
import warnings

import ml_collections
import numpy as np

from elf_jax import fs, recipes
from elf_jax.config import SAMPLE_PRESET_FIELDS, ConfigError, base_config
from elf_jax.data import pipeline
from elf_jax.model.elf import ModelConfig
from elf_jax.run import experiment
from elf_jax.run import generate as gen
from elf_jax.sampling import sampler
from elf_jax.sampling.files import Samples
from elf_jax.weights import published

_TRAIN_CONFIG = "config_train.json"  # written by `elf_jax.main` into the workdir of a training run
# ModelConfig field → the config field that sets it (what a checkpoint's shapes fix).
_DIMENSIONS = {"latent_dim": "encoder.dim", "hidden_size": "model.hidden_size", "depth": "model.depth",
               "num_heads": "model.num_heads", "bottleneck_dim": "model.bottleneck_dim",
               "vocab_size": "model.vocab_size", "swiglu_hidden": "model.mlp_ratio",
               "num_time_tokens": "model.num_time_tokens", "num_guidance_tokens": "model.num_guidance_tokens",
               "num_mode_tokens": "model.num_mode_tokens"}


@dataclasses.dataclass(frozen=True)
class Texts:
  """Outputs of `generate`, `complete` or `condition`, in the order of the inputs.

  texts: the decoded outputs (for `complete`, the continuation only); ids: (N, S) int32 their token ids (pad after
  the end); inputs: the prefix or condition each output follows, as the model saw it (cut to its limit), or None.
  """
  texts: list[str]
  ids: np.ndarray
  inputs: list[str] | None = None

  @property
  def full_texts(self) -> list[str]:
    """Input and output joined by a space (a completion: the prefix and its continuation)."""
    return [f"{i} {t}".strip() for i, t in zip(self.inputs or [""] * len(self.texts), self.texts)]


@dataclasses.dataclass(frozen=True)
class Scores:
  """metrics: the scores of --mode=eval (Gen. PPL, entropy; BLEU / ROUGE with references; the synthetic language's
  ratios); per_sample: one list per metric with a value per text (`entropy`: unigram entropy of its tokens in nats;
  the synthetic language, unconditional: `log_prob`, -inf for an ungrammatical sentence)."""
  metrics: dict[str, float]
  per_sample: dict[str, list[float]]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` set as `--config.x=y` sets them: keys "group.field" (or "group__field" for
  keyword arguments), or a group name with a dict of fields; a field that does not exist or a value of the wrong
  type is one ConfigError."""
  config = copy.deepcopy(config)
  flat = {}
  for key, value in overrides.items():
    key = key.replace("__", ".")
    if isinstance(value, Mapping):
      flat.update({f"{key}.{k}": v for k, v in value.items()})
    else:
      flat[key] = value
  for key, value in flat.items():
    *groups, field = key.split(".")
    node = config
    try:
      for group in groups:
        node = node[group]
      if field not in node:
        raise KeyError(field)
      node[field] = value
    except (KeyError, AttributeError, TypeError) as e:
      raise ConfigError(f"override {key}={value!r}: {type(e).__name__} ({e}); every field is listed in "
                        "elf_jax/config.py (base_config)") from None
  return config


def _config_from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config (config_train.json) over `base_config()`: fields it lacks keep their defaults, tuples stay
  tuples."""
  config = base_config()

  def overlay(node, values):
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict):
        overlay(node[key], value)
      elif isinstance(node[key], tuple):
        node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      else:
        node[key] = value

  overlay(config, json.loads(text))
  return config


def _task_config(source: str, found: published.Detected) -> tuple[ml_collections.ConfigDict, str | None]:
  """(config, workdir or None) of a checkpoint: its workdir's config_train.json, else the published table."""
  for directory in (found.path, *list(found.path.parents)[:3]):
    if (directory / _TRAIN_CONFIG).exists():
      return _config_from_json((directory / _TRAIN_CONFIG).read_text()), str(directory)
  config = recipes.official_recipe(source)
  if config is not None:
    return config, None
  raise ConfigError(
      f"elf_jax.load({source!r}): the task (conditional or not, max_length, sampling preset) is not in the weights, "
      f"and this is neither one of our workdirs (no {_TRAIN_CONFIG}) nor a published checkpoint "
      f"(embedded-language-flows/{{{','.join(recipes.OFFICIAL_CHECKPOINTS)}}}[-torch]); pass config=, e.g. "
      "elf_jax.load(path, config=elf_jax.recipes.owt('b'))")


def _check_dimensions(config: ml_collections.ConfigDict, params, source: str) -> None:
  """One ConfigError naming every dimension where `config` and the checkpoint's parameters disagree."""
  ours, theirs = ModelConfig.from_config(config), ModelConfig.from_params(params)
  wrong = [f"{field} {getattr(ours, attr)} vs checkpoint {getattr(theirs, attr)}" for attr, field in
           _DIMENSIONS.items() if getattr(ours, attr) != getattr(theirs, attr)]
  if wrong:
    raise ConfigError(f"elf_jax.load({source!r}): the config does not match the checkpoint's network: "
                      f"{'; '.join(wrong)}; drop those fields from config= / the overrides (the checkpoint sets them)")


def _fill_dimensions(config: ml_collections.ConfigDict, params) -> ml_collections.ConfigDict:
  """`config` with the network dimensions read off `params` (the published table's recipes do not know M / L / B
  apart from the id; a config= given by the user is checked, not filled)."""
  dims = ModelConfig.from_params(params)
  config = copy.deepcopy(config)
  for attr, field in _DIMENSIONS.items():
    group, name = field.split(".")
    if attr != "swiglu_hidden":
      config[group][name] = getattr(dims, attr)
  return config


def load(id_or_path: str, config: ml_collections.ConfigDict | None = None, **overrides) -> "Model":
  """An ELF model ready to sample, complete, condition and score.

  Args:
    id_or_path: a Hugging Face hub id (`embedded-language-flows/ELF-B-owt`, `org/name/sub/folder`), one of our
      workdirs (local or gs://), a checkpoint file or folder: anything `elf_jax.weights.published.detect_format`
      recognises.
    config: the run config (a recipe, e.g. `elf_jax.recipes.owt("b")`); default: the workdir's config_train.json
      or the published checkpoint's recipe.
    overrides: config fields, as `--config.x=y` would set them: `**{"sample.steps": 64}`, `sample__steps=64` or
      `sample=dict(steps=64)`.

  Raises:
    ConfigError: one line: no checkpoint there (the formats tried), an id that cannot be fetched, no task config,
      a config whose network dimensions differ from the checkpoint's, an unknown override.
  """
  source = str(id_or_path)
  found = published.detect_format(source, field="elf_jax.load(id_or_path)")
  given = config is not None
  config, workdir = (config, None) if given else _task_config(source, found)
  tree = published.load_published_elf(found.path, "ema", field="elf_jax.load(id_or_path)")
  if not given:
    config = _fill_dimensions(config, tree)
  config = apply_overrides(config, overrides)
  _check_dimensions(config, tree, source)
  exp = experiment.build(config, workdir)
  params = exp.replicated(published.conform(tree, exp.param_shapes, found.path))
  return Model(exp, params, source)


class Model:
  """A loaded ELF network with its task: `config` (the full run config), `params` (the EMA parameters, on every
  local device), `experiment` (tokenizer, encoder, mesh). Built by `load`."""

  def __init__(self, exp: experiment.Experiment, params, source: str):
    self.experiment, self.params, self.source = exp, params, source

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.experiment.config

  @property
  def conditional(self) -> bool:
    return bool(self.config.data.conditional)

  def __repr__(self) -> str:
    m = self.config.model
    kind = "conditional" if self.conditional else "unconditional"
    return (f"elf_jax.Model({self.source!r}: {kind}, depth {m.depth}, width {m.hidden_size}, "
            f"max_length {self.config.data.max_length})")

  def sample_config(self, preset: str | None = None, **fields) -> sampler.SampleConfig:
    """The sampler settings: `config.sample`, then `preset` (if given: its values replace the config's, which a
    saved config_train.json holds resolved), then the given fields (None = unset), each one of
    SAMPLE_PRESET_FIELDS (anything else is one ConfigError)."""
    unknown = sorted(set(fields) - set(SAMPLE_PRESET_FIELDS))
    if unknown:
      raise ConfigError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are preset and "
                        f"{', '.join(SAMPLE_PRESET_FIELDS)} (as the sample.* fields of elf_jax/config.py)")
    config = self.config
    if preset is not None:
      config = apply_overrides(config, {"sample": {"preset": preset, **dict.fromkeys(SAMPLE_PRESET_FIELDS)}})
    ids = dict(eos_id=self.experiment.tokenizer.eos_token_id, pad_id=self.experiment.tokenizer.pad_token_id)
    return sampler.SampleConfig.from_config(config, **ids, **{k: v for k, v in fields.items() if v is not None})

  def generate(self, num_samples: int, *, preset: str | None = None, steps: int | None = None,
               gamma: float | None = None, guidance_scale: float | None = None, seed: int | None = None) -> Texts:
    """`num_samples` free samples of an unconditional model (a conditional one samples from a condition: use
    `condition`). Every method's `seed` defaults to the config's."""
    if self.conditional:
      raise ConfigError("generate() samples without a condition, but this model is conditional "
                        "(data.conditional=True): use condition(inputs) with your documents or sentences")
    sc = self.sample_config(preset, steps=steps, gamma=gamma, guidance_scale=guidance_scale)
    return self._texts(gen.generate(self.experiment, self.params, num_samples, self._seed(seed), sc,
                                    progress=True).samples)

  def complete(self, prefixes: Sequence[str], *, seed: int | None = None, **settings) -> Texts:
    """Continues each prefix (unconditional models): its clean latents are held at their positions at every step,
    as a condition's are, and the rest is sampled (an approximation: the model was not trained to continue text).
    `settings`: as `condition`'s. Outputs: the continuations (`full_texts`: prefix + continuation)."""
    if self.conditional:
      raise ConfigError("complete() continues text with an unconditional model, but this model is conditional "
                        "(data.conditional=True): use condition(inputs)")
    return self._from_inputs(prefixes, "prefixes", seed, settings)

  def condition(self, inputs: Sequence[str], *, seed: int | None = None, **settings) -> Texts:
    """Summarises / translates each input with a conditional model, with its own sampling settings (the recipe's
    preset: classifier-free guidance) unless `settings` say otherwise: `preset` and the sample.* fields method,
    steps, grid, grid_p_mean, grid_p_std, gamma, guidance_scale, cfg_scale (`sample_config`)."""
    if not self.conditional:
      raise ConfigError("condition() needs a conditional model (summarisation, translation), but this model is "
                        "unconditional (data.conditional=False): use complete(prefixes) to continue text")
    return self._from_inputs(inputs, "inputs", seed, settings)

  def score(self, texts: Sequence[str], references: Sequence[str] | None = None) -> Scores:
    """The scores of `texts` by the scorers of --mode=eval (with `references`: BLEU and ROUGE as well; a conditional
    model's outputs are scored against references only)."""
    texts = list(texts)
    exp = self.experiment
    if references is None and self.conditional:
      raise ConfigError("score() of a conditional model's outputs needs references=[...], one target text per text "
                        "(BLEU / ROUGE)")
    if references is not None and len(references) != len(texts):
      raise ConfigError(f"score(): {len(texts)} texts but {len(references)} references; give one reference per text")
    metrics = dict(gen.score(exp, Samples(texts=texts)) if references is None or not self.conditional else
                   gen.score(exp, Samples(texts=texts, references=list(references))))
    if references is not None and not self.conditional:
      from elf_jax.eval import text_metrics  # pylint: disable=import-outside-toplevel
      metrics.update(bleu=text_metrics.bleu(texts, list(references)), **text_metrics.rouge(texts, list(references)))
    from elf_jax.eval import gen_ppl  # pylint: disable=import-outside-toplevel
    tokenize = lambda t: exp.tokenizer(t, add_special_tokens=False)["input_ids"]
    per_sample = {"entropy": [gen_ppl.unigram_entropy(tokenize(t)) if t else float("nan") for t in texts]}
    if exp.language is not None and not self.conditional:  # the synthetic source language, not the outputs'
      per_sample["log_prob"] = [exp.language.log_prob(t) for t in texts]
    return Scores(metrics, per_sample)

  def trajectory(self, out_dir: str, num_samples: int = 4, *, prefixes: Sequence[str] | None = None,
                 inputs: Sequence[str] | None = None, seed: int | None = None, **settings) -> dict[str, str]:
    """Samples (or completes `prefixes`, or conditions on `inputs`) and writes the denoising trajectory page of
    those samples: out_dir/trajectory.{html,jsonl,png}. Returns the paths."""
    sc = dataclasses.replace(self.sample_config(**settings), return_trajectory=True)
    texts = prefixes if prefixes is not None else inputs
    if texts is None and self.conditional:
      raise ConfigError("trajectory() of a conditional model needs inputs=[...] (its conditions)")
    rows = None if texts is None else self.input_rows(texts, "prefixes" if prefixes is not None else "inputs")
    result = gen.generate(self.experiment, self.params, len(texts) if texts is not None else num_samples,
                          self._seed(seed), sc, rows, eval_references=False, progress=True)
    return gen.render_first_batch(self.experiment, self.params, result, out_dir, sc,
                                  len(texts) if texts is not None else num_samples)

  def input_rows(self, texts: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """`ids`, `valid`, `cond_mask` (N, S) of the user's texts as known leading positions: a conditional model's
    condition (cut to data.max_condition_length), an unconditional model's prefix (cut to data.max_length − 1).
    Empty texts are one ConfigError naming `where`[i]; cut ones a warning naming the limit."""
    return input_rows(self.experiment, texts, where)

  def _from_inputs(self, texts: Sequence[str], where: str, seed: int | None, settings) -> Texts:
    rows = self.input_rows(texts, where)
    sc = self.sample_config(**settings)
    result = gen.generate(self.experiment, self.params, len(rows["ids"]), self._seed(seed), sc, rows,
                          eval_references=False, progress=True)
    return self._texts(result.samples)

  def _seed(self, seed: int | None) -> int:
    """The given seed, else the config's."""
    return self.config.seed if seed is None else seed

  def _texts(self, samples: Samples) -> Texts:
    return Texts(samples.texts, np.asarray(samples.ids, np.int32), samples.conditions)


def input_rows(exp: experiment.Experiment, texts: Sequence[str], where: str,
               name_of: Callable[[int], str] | None = None) -> dict[str, np.ndarray]:
  """See `Model.input_rows`; `name_of(i)` names the i-th text in messages (default `where[i]`)."""
  d = exp.config.data
  name_of = name_of or (lambda i: f"{where}[{i}]")
  if isinstance(texts, str):
    raise ConfigError(f"{where}: pass a list of texts, not one string")
  limit, name = ((d.max_condition_length, "data.max_condition_length") if d.conditional
                 else (d.max_length - 1, "data.max_length - 1, leaving room to continue"))
  layout = dataclasses.replace(pipeline.make_layout(exp.config, exp.tokenizer), max_condition_length=limit)
  rows = []
  for i, text in enumerate(texts):
    ids = layout.encode(text, exp.tokenizer) if isinstance(text, str) and text.strip() else np.zeros(0, np.int32)
    if not len(ids):
      raise ConfigError(f"{name_of(i)} is empty (or has no tokens): give it some text")
    if len(ids) > limit:
      warnings.warn(f"{name_of(i)} has {len(ids)} tokens; cut to the model's limit of {limit} ({name})",
                    stacklevel=3)
    rows.append(layout.row(np.zeros(0, np.int32), ids))
  if not rows:
    raise ConfigError(f"{where}: no texts given")
  known = np.stack([r["cond_mask"] for r in rows])
  # The encoder sees the given text only (not the padding after it, even under flow.encode_padding).
  return {"ids": np.stack([r["ids"] for r in rows]), "valid": known, "cond_mask": known}


def read_inputs(path: str) -> list[str]:
  """The inputs of `--config.sample.inputs=FILE`: one text per line, or JSON lines with a "text" or "input"
  field."""
  file = fs.path(path)
  if not file.exists():
    raise ConfigError(f"sample.inputs={path!r}: no such file; give a file with one input per line (or JSONL)")
  texts = []
  for number, line in enumerate(file.read_text().splitlines(), 1):
    if line.lstrip().startswith("{"):
      record = json.loads(line)
      if not ({"text", "input"} & set(record)):
        raise ConfigError(f"sample.inputs={path!r} line {number}: a JSON line needs a 'text' or 'input' field")
      line = record.get("text", record.get("input"))
    texts.append(line)
  return texts


def answer_inputs(exp: experiment.Experiment, params, texts: list[str], seed: int) -> Samples:
  """`--mode=sample` with `sample.inputs`: one output per input, in order (conditioned on it, or continuing it)."""
  path = exp.config.sample.inputs
  rows = input_rows(exp, texts, f"sample.inputs={path!r}", lambda i: f"sample.inputs={path!r} line {i + 1}")
  return gen.generate(exp, params, len(texts), seed, None, rows, eval_references=False).samples

