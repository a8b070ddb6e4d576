"""The Python API (`elf_jax.load` → Model) and `--mode=sample --config.sample.inputs=FILE`, on a tiny model trained
here for a few steps (configs/tiny.py shrunk as in tests/run/test_train_loop.py)."""
import json
import warnings

import jax
import numpy as np
import pytest

import elf_jax
from elf_jax.config import ConfigError
from elf_jax.run import api, modes, train_loop
from elf_jax.run import generate as gen
from elf_jax.weights import published

from tests.run.test_train_loop import small_config

pytestmark = pytest.mark.slow  # a short training run (about 1.5 min on 2 cores) feeds every test here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir trained for 6 steps, with the config_train.json that `elf_jax.main` writes."""
  workdir = tmp_path_factory.mktemp("api")
  config = small_config()
  train_loop.train(config, str(workdir))
  (workdir / "config_train.json").write_text(config.to_json_best_effort(indent=2))
  return workdir


@pytest.fixture(scope="module")
def model(workdir):
  return elf_jax.load(str(workdir), **{"sample.steps": 2}, sample__batch_size=8)


def _sentences(model, n):
  return gen.held_out_texts(model.experiment, n)


def test_load_takes_the_task_from_the_workdir_and_the_ema_params(workdir, model):
  assert elf_jax.load is api.load
  assert model.config.model.hidden_size == 32 and model.config.data.max_length == 16  # config_train.json
  assert model.config.sample.steps == 2 and model.config.sample.batch_size == 8  # the overrides
  ema = published.load_params_from(str(workdir), model.experiment.param_shapes)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_generate_is_reproducible_and_compiles_once(model):
  first = model.generate(4, seed=3)
  hits = gen.compiled_sampler.cache_info().hits
  again = model.generate(4, seed=3)
  assert gen.compiled_sampler.cache_info().hits == hits + 1  # the same compiled sampler
  assert first.texts == again.texts and len(first.texts) == 4 and first.ids.shape == (4, 16)
  other = model.generate(4, seed=3, steps=3, gamma=0.5, guidance_scale=1.0)
  assert other.ids.shape == (4, 16)
  cli = gen.generate(model.experiment, model.params, 4, 3, model.sample_config()).samples  # what the CLI draws
  assert cli.texts == first.texts


def test_complete_keeps_the_prefix_and_continues_it(model):
  sentences = _sentences(model, 3)
  prefixes = [" ".join(s.split()[:2]) for s in sentences]
  out = model.complete(prefixes, seed=0)
  assert out.inputs == prefixes  # the prefix as the model saw it (the word tokenizer round-trips)
  assert [f.startswith(p) for f, p in zip(out.full_texts, prefixes)] == [True] * 3
  assert out.ids.shape == (3, 16)
  # The prefix's positions are held: the continuation is not drawn as free samples are.
  free = model.generate(3, seed=0)
  assert out.texts != free.texts


def test_bad_inputs_are_one_line(model):
  sentences = _sentences(model, 1)
  long = " ".join([sentences[0]] * 10)
  with pytest.warns(UserWarning, match=r"prefixes\[0\] has \d+ tokens; cut to the model's limit of 15 "
                                       r"\(data.max_length - 1"):
    model.complete([long])
  for call, match in ((lambda: model.complete([sentences[0], "  "]), r"prefixes\[1\] is empty"),
                      (lambda: model.condition(["anything"]), r"condition\(\) needs a conditional model"),
                      (lambda: model.complete(sentences[0]), "pass a list of texts")):
    with pytest.raises(ConfigError, match=match) as err:
      call()
    assert "\n" not in str(err.value)


def test_score_uses_the_eval_scorers(model):
  sentences = _sentences(model, 4)
  scores = model.score(sentences)
  assert scores.metrics["gen_ppl_ratio"] == pytest.approx(1.0)  # true sentences against true sentences
  assert len(scores.per_sample["entropy"]) == 4 and all(np.isfinite(scores.per_sample["log_prob"]))
  with_refs = model.score(sentences, references=sentences)
  assert with_refs.metrics["bleu"] == pytest.approx(100.0)


def test_trajectory_of_the_users_prefixes(model, tmp_path):
  paths = model.trajectory(str(tmp_path), prefixes=[_sentences(model, 1)[0].split()[0]])
  assert "trajectory" in open(paths["html"]).read().lower()
  rows = [json.loads(line) for line in open(paths["jsonl"])]
  assert len(rows) == 3 and len(rows[0]["texts"]) == 1  # 2 steps + the final sample, one example


def test_overrides_and_dimensions(workdir):
  with pytest.raises(ConfigError, match=r"override sample.nonexistent=1"):
    elf_jax.load(str(workdir), **{"sample.nonexistent": 1})
  with pytest.raises(ConfigError, match=r"model.depth 3 vs checkpoint 1"):
    elf_jax.load(str(workdir), model__depth=3)


def test_a_checkpoint_without_a_task_needs_config(tiny_fixture_dir):
  with pytest.raises(ConfigError, match=r"pass config=") as err:
    elf_jax.load(str(tiny_fixture_dir / "checkpoint_7"))
  assert "\n" not in str(err.value)


def test_cli_sample_inputs_writes_one_output_per_input(workdir, model, tmp_path):
  sentences = _sentences(model, 3)
  inputs = tmp_path / "inputs.txt"
  inputs.write_text(f"{sentences[0].split()[0]}\n" + json.dumps({"text": " ".join(sentences[1].split()[:2])})
                    + f"\n{sentences[2]}\n")
  config = api.apply_overrides(model.config, {"sample.inputs": str(inputs)})
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing is cut
    path = modes.sample_mode(config, str(workdir))
  rows = [json.loads(line) for line in open(path)]
  assert [r["condition"] for r in rows] == [sentences[0].split()[0], " ".join(sentences[1].split()[:2]), sentences[2]]
