"""The Python API (`elf_jax.load` → Model) and `--mode=sample --config.sample.inputs=FILE`, on tiny models trained
here for a few steps: configs/tiny.py and the conditional demo configs/tiny_cond.py, both shrunk as in
tests/run/test_train_loop.py (quality is irrelevant: shapes, order, limits, errors and settings are checked)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import elf_jax
from elf_jax.config import ConfigError, load_config_file, resolve
from elf_jax.run import api, modes, train_loop
from elf_jax.run import generate as gen
from elf_jax.weights import published

from tests.conftest import REPO, SMALL, small_config

pytestmark = pytest.mark.slow  # two short training runs (about 1.5 min each on 2 cores) feed every test here


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
  assert model.config.model.hidden_size == 32  # config_train.json
  assert model.config.data.max_length == small_config().data.max_length
  assert model.config.sample.steps == 2 and model.config.sample.batch_size == 8  # the overrides
  ema = published.load_params_from(str(workdir), model.experiment.param_shapes)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_generate_is_reproducible_and_compiles_once(model):
  first = model.generate(4, seed=3)
  hits = gen.compiled_sampler.cache_info().hits
  again = model.generate(4, seed=3)
  assert gen.compiled_sampler.cache_info().hits == hits + 1  # the same compiled sampler
  length = model.config.data.max_length
  assert first.texts == again.texts and len(first.texts) == 4 and first.ids.shape == (4, length)
  other = model.generate(4, seed=3, steps=3, gamma=0.5, guidance_scale=1.0)
  assert other.ids.shape == (4, length)
  cli = gen.generate(model.experiment, model.params, 4, 3, model.sample_config()).samples  # what the CLI draws
  assert cli.texts == first.texts


def test_few_samples_run_a_smaller_batch_with_the_same_rows(model):
  """Fewer samples than sample.batch_size (8) run the smallest power-of-two batch that holds them, and row i is the
  same draw at every batch size."""
  assert [gen.sampling_batch(n, 8, 1) for n in (1, 2, 3, 5, 8, 20)] == [1, 2, 4, 8, 8, 8]
  assert [gen.sampling_batch(n, 250, 8) for n in (1, 9, 40, 500)] == [8, 16, 64, 248]
  three, eight = model.generate(3, seed=5), model.generate(8, seed=5)
  np.testing.assert_array_equal(three.ids, eight.ids[:3])


def test_complete_keeps_the_prefix_and_continues_it(model):
  sentences = _sentences(model, 3)
  prefixes = [" ".join(s.split()[:2]) for s in sentences]
  out = model.complete(prefixes, seed=0)
  assert out.inputs == prefixes  # the prefix as the model saw it (the word tokenizer round-trips)
  assert [f.startswith(p) for f, p in zip(out.full_texts, prefixes)] == [True] * 3
  assert out.ids.shape == (3, model.config.data.max_length)
  # The prefix's positions are held: the continuation is not drawn as free samples are.
  free = model.generate(3, seed=0)
  assert out.texts != free.texts


def test_bad_inputs_are_one_line(model):
  sentences = _sentences(model, 1)
  long = " ".join([sentences[0]] * 10)
  limit = model.config.data.max_length - 1
  with pytest.warns(UserWarning, match=rf"prefixes\[0\] has \d+ tokens; cut to the model's limit of {limit} "
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


# The conditional demo: configs/tiny_cond.py with SMALL (6 steps); its recipe samples with the cond_ode64 preset
# (classifier-free guidance s = 2) at sample.steps (here SMALL's 4, 2 for the loaded model).


@pytest.fixture(scope="module")
def cond_workdir(tmp_path_factory):
  """A tiny_cond workdir trained for 6 steps, with the resolved config_train.json that `elf_jax.main` writes (every
  sampling setting filled in from the recipe's preset)."""
  workdir = tmp_path_factory.mktemp("api_cond")
  config = load_config_file(REPO / "configs" / "tiny_cond.py", SMALL)
  train_loop.train(config, str(workdir))
  (workdir / "config_train.json").write_text(resolve(config).to_json_best_effort(indent=2))
  return workdir


@pytest.fixture(scope="module")
def cond_model(cond_workdir):
  return elf_jax.load(str(cond_workdir), sample__steps=2, sample__batch_size=8)


def _sources(model, n):
  """The first n source sentences of the evaluation split (each within data.max_condition_length words)."""
  return gen.held_out_texts(model.experiment, n, field="input")


def test_condition_gives_one_output_per_input_in_order(cond_model):
  assert cond_model.conditional and "conditional" in repr(cond_model)
  sources = _sources(cond_model, 10)  # two sampler batches of 8 rows, the second wrapped around and cut
  assert all(len(s.split()) <= 12 for s in sources)
  out = cond_model.condition(sources, seed=0)
  assert out.inputs == sources  # the conditions as the model saw them (the word tokenizer round-trips)
  assert len(out.texts) == 10 and out.ids.shape == (10, 24) and out.ids.dtype == np.int32
  # Outputs are target words only (the condition is stripped), at most max_length − max_condition_length tokens.
  tokenizer = cond_model.experiment.tokenizer
  assert (out.ids[:, 12:] == tokenizer.pad_token_id).all()
  assert out.texts == gen.decode(cond_model.experiment, out.ids)
  # Row i answers input i: the first input alone gets the first output (same row, same noise).
  assert cond_model.condition(sources[:1], seed=0).texts == out.texts[:1]


def test_condition_latents_stay_clean_and_the_condition_is_the_tokenized_input(cond_model):
  exp, sources = cond_model.experiment, _sources(cond_model, 8)  # one whole batch: the encoder sees the same shapes
  rows = cond_model.input_rows(sources, "inputs")
  for i, source in enumerate(sources):
    tokens = exp.tokenizer(source, add_special_tokens=False)["input_ids"]
    assert rows["cond_mask"][i].sum() == len(tokens)
    np.testing.assert_array_equal(rows["ids"][i][rows["cond_mask"][i]], tokens)
  sc = dataclasses.replace(cond_model.sample_config(), return_trajectory=True)
  result = gen.generate(exp, cond_model.params, 8, 0, sc, rows, eval_references=False)
  clean = gen.compiled_encoder(exp.encoder)(exp.encoder_params, rows["ids"], rows["valid"], rows["cond_mask"])
  mask = rows["cond_mask"]
  final, clean = np.asarray(result.first_batch.latents), np.asarray(clean)
  np.testing.assert_array_equal(final[mask], clean[mask])  # exactly the input's latents at the end
  for x_hat in np.asarray(result.first_batch.trajectory):  # and in the denoiser's estimate at every step
    np.testing.assert_array_equal(x_hat[mask], clean[mask])
  assert not np.allclose(final[~mask], clean[~mask])  # the targets were sampled
  assert result.samples.conditions == sources


def test_condition_is_reproducible_and_its_settings_override(cond_model):
  sources = _sources(cond_model, 4)
  sc = cond_model.sample_config()
  assert (sc.method, sc.steps, sc.cfg_scale, sc.guidance_scale) == ("ode", 2, 2.0, 1.0)  # the recipe's, steps=2
  first = cond_model.condition(sources, seed=1)
  again = cond_model.condition(sources, seed=1)
  assert first.texts == again.texts
  np.testing.assert_array_equal(first.ids, again.ids)
  assert not np.array_equal(cond_model.condition(sources, seed=2).ids, first.ids)
  no_cfg = cond_model.condition(sources, seed=1, cfg_scale=1.0)
  assert not np.array_equal(no_cfg.ids, first.ids)  # guidance changes the draw
  assert cond_model.sample_config(cfg_scale=1.0).cfg_scale == 1.0
  assert cond_model.condition(sources, seed=1, cfg_scale=2.0, steps=2).texts == first.texts  # the defaults again
  # A preset replaces the saved (resolved) settings; fields given beside it win over the preset.
  sde = cond_model.sample_config(preset="owt_sde32")
  assert (sde.method, sde.steps, sde.gamma, sde.cfg_scale) == ("sde", 32, 1.5, 1.0)
  assert cond_model.sample_config(preset="cond_ode64", steps=3).steps == 3
  assert cond_model.condition(sources[:1], seed=1, preset="cond_ode64", steps=2).texts == first.texts[:1]
  with pytest.raises(ConfigError, match=r"unknown sampling setting\(s\) cfg; the settings are preset and method, "
                                        r"steps") as err:
    cond_model.condition(sources, cfg=2.0)
  assert "\n" not in str(err.value)


def test_conditional_bad_inputs_are_one_line(cond_model):
  sources = _sources(cond_model, 2)
  long = " ".join(sources * 3)
  assert len(long.split()) > 12
  with pytest.warns(UserWarning, match=r"inputs\[1\] has \d+ tokens; cut to the model's limit of 12 "
                                       r"\(data.max_condition_length\)"):
    out = cond_model.condition([sources[0], long], seed=0)
  assert out.inputs == [sources[0], " ".join(long.split()[:12])]
  for call, match in ((lambda: cond_model.condition([sources[0], " "]), r"^inputs\[1\] is empty"),
                      (lambda: cond_model.condition([]), r"^inputs: no texts given"),
                      (lambda: cond_model.condition(sources[0]), "pass a list of texts"),
                      (lambda: cond_model.generate(2), r"^generate\(\) samples without a condition.*use "
                                                       r"condition\(inputs\)"),
                      (lambda: cond_model.complete(sources), r"^complete\(\) continues text .*use condition"),
                      (lambda: cond_model.trajectory("unused"), r"trajectory\(\) of a conditional model needs "
                                                                r"inputs=")):
    with pytest.raises(ConfigError, match=match) as err:
      call()
    assert "\n" not in str(err.value)


def test_conditional_outputs_are_scored_against_references(cond_model):
  references = gen.held_out_texts(cond_model.experiment, 4, field="output")
  scores = cond_model.score(references, references=references)
  assert scores.metrics["bleu"] == pytest.approx(100.0) and "gen_ppl" not in scores.metrics
  assert set(scores.per_sample) == {"entropy"}  # no log-probability under the source language
  with pytest.raises(ConfigError, match=r"score\(\) of a conditional model's outputs needs references="):
    cond_model.score(references)


def test_cli_sample_inputs_on_the_conditional_demo(cond_workdir, cond_model, tmp_path):
  """The recipe's config as --config=configs/tiny_cond.py gives it (preset unresolved) with sample.inputs: one
  output per line, in order, drawn with the recipe's guidance (the same as `condition` with its defaults)."""
  sources = _sources(cond_model, 3)
  long = " ".join(sources * 2)
  inputs = tmp_path / "inputs.txt"
  inputs.write_text(f"{sources[0]}\n" + json.dumps({"input": sources[1]}) + f"\n{long}\n")
  config = load_config_file(REPO / "configs" / "tiny_cond.py",
                            {**SMALL, "sample.steps": 2, "sample.inputs": str(inputs)})
  with pytest.warns(UserWarning, match=r"line 3 has \d+ tokens; cut to the model's limit of 12 "
                                       r"\(data.max_condition_length\)"):
    path = modes.sample_mode(config, str(cond_workdir))
  assert os.path.basename(path) == "inputs_sample_ode2_w1_seed0.jsonl"
  rows = [json.loads(line) for line in open(path)]
  seen = [sources[0], sources[1], " ".join(long.split()[:12])]
  assert [r["condition"] for r in rows] == seen
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the cut line, as above
    expected = cond_model.condition([sources[0], sources[1], long], seed=0)
  assert [r["text"] for r in rows] == expected.texts  # cfg_scale 2 (cond_ode64), not 1
  assert expected.texts != cond_model.condition(seen, seed=0, cfg_scale=1.0).texts
  inputs.write_text(f"{sources[0]}\n\n{sources[1]}\n")
  with pytest.raises(ConfigError, match=r"sample.inputs=.* line 2 is empty") as err:
    modes.sample_mode(config, str(cond_workdir))
  assert "\n" not in str(err.value)


def test_an_exported_model_loads_with_its_config(cond_workdir, cond_model, tmp_path):
  """The layout of examples/tiny_cond: the EMA weights exported as safetensors (no torch) beside the run's
  config_train.json and latent_stats.json, loaded by folder or by file."""
  folder = tmp_path / "exported"
  folder.mkdir()
  export = [sys.executable, "-m", "elf_jax.run.export", f"--source={cond_workdir}",
            f"--safetensors={folder / 'ema.safetensors'}"]
  subprocess.run(export, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  for name in ("config_train.json", "latent_stats.json"):
    shutil.copy(cond_workdir / name, folder / name)
  assert sorted(os.listdir(folder)) == ["config_train.json", "ema.safetensors", "latent_stats.json"]
  for source in (folder, folder / "ema.safetensors"):
    loaded = elf_jax.load(str(source), sample__steps=2, sample__batch_size=8)
    assert loaded.conditional and loaded.experiment.encoder.latent_std == cond_model.experiment.encoder.latent_std
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(cond_model.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sources = _sources(cond_model, 2)
  assert loaded.condition(sources, seed=0).texts == cond_model.condition(sources, seed=0).texts


def test_the_shipped_conditional_demo_loads():
  """examples/tiny_cond (the quickstart's translation model, sampled by tests/integration/test_notebook.py): read
  through its folder with its config, latent statistics and the recipe's sampling settings."""
  folder = REPO / "examples" / "tiny_cond"
  assert (folder / "ema.safetensors").stat().st_size < 5 * 2**20
  model = elf_jax.load(str(folder))
  assert model.conditional and model.config.data.max_condition_length == 12
  assert model.experiment.encoder.latent_std == pytest.approx(0.9994434991063942)  # its latent_stats.json
  assert model.sample_config().cfg_scale == 2.0 and model.sample_config().steps == 32  # cond_ode64 at 32 steps
  ema = published.load_params_from(str(folder / "ema.safetensors"), model.experiment.param_shapes)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), b)
