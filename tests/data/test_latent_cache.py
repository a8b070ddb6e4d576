"""Latent cache: stored rows and latents equal the pipeline's rows and the encoder's output; the train-step loss is
the same with cached latents as with the encoder run on the fly; a cache built for another config is refused."""
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from elf_jax.config import load_config_file
from elf_jax.data import latent_cache, pipeline, sources
from elf_jax.data import tokenizer as tokenizers_
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.model.t5_encoder import make_encoder_mask
from elf_jax.objective import flow
from elf_jax.objective import step as step_lib
from elf_jax.run import cache_latents
from elf_jax.weights.encoder import build_encoder

ROWS = 40
TINY = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"


def _config(packing=False):
  c = load_config_file(TINY)
  c.data.synthetic_num_sentences = 200
  c.data.packing = packing
  c.encoder.measure_latent_stats = False
  c.encoder.latent_mean, c.encoder.latent_std = 0.3, 0.7  # the cache stores raw outputs; normalisation at use
  c.optim.global_batch_size = 8
  return c


def _tokenizer(c):
  language = sources.make_language(c.data)
  return tokenizers_.load_tokenizer(c.data.tokenizer, language), language


@pytest.fixture(scope="module", params=[False, True], ids=["padded", "packed"])
def built(request, tmp_path_factory):
  c = _config(packing=request.param)
  out = str(tmp_path_factory.mktemp("cache"))
  index = cache_latents.build_cache(c, out, max_rows=ROWS, batch_size=16, rows_per_shard=24)
  return c, out, index


def test_stored_rows_and_latents_equal_pipeline_and_encoder(built):
  c, out, index = built
  assert index["num_rows"] == ROWS and [s["rows"] for s in index["shards"]] == [32, 8]  # flush after 2 batches
  assert json.load(open(f"{out}/index.json"))["normalised"] is False
  rows = latent_cache.CachedRows(out)
  cached = {k: np.stack([rows[i][k] for i in range(ROWS)]) for k in ("ids", "valid", "loss_mask", "latents")}
  tok, language = _tokenizer(c)
  ds = pipeline.make_dataset(c, tok, c.data.split, language=language, shuffle=False, num_epochs=1,
                             batch_size=ROWS)
  ref = next(iter(ds))
  np.testing.assert_array_equal(cached["ids"], ref["ids"])
  np.testing.assert_array_equal(cached["valid"], ref["valid"])
  np.testing.assert_array_equal(cached["loss_mask"], ref["loss_mask"])
  # Raw encoder outputs, by calling the T5 module directly (no normalisation).
  encoder, enc_params = build_encoder(c)
  raw = encoder.t5.apply({"params": enc_params}, ref["ids"], make_encoder_mask(ref["valid"], None, None))
  np.testing.assert_allclose(cached["latents"], np.asarray(raw), rtol=1e-5, atol=1e-5)
  assert cached["latents"].dtype == np.float32 and cached["latents"].shape == (ROWS, c.data.max_length, c.encoder.dim)


@pytest.mark.slow
def test_same_loss_with_cached_latents_as_on_the_fly(built):
  c, out, _ = built
  c = _config(packing=c.data.packing)
  c.data.latent_cache_dir = out
  tok, language = _tokenizer(c)
  batch = next(iter(pipeline.make_dataset(c, tok, c.data.split, language=language)))
  assert set(batch) == {"ids", "valid", "cond_mask", "loss_mask", "latents"}
  assert batch["latents"].shape == (8, c.data.max_length, c.encoder.dim) and not batch["cond_mask"].any()
  encoder, enc_params = build_encoder(c)
  model = ELF(ModelConfig.from_config(c))
  params = nn.unbox(init_params(model, jax.random.key(0), c.data.max_length))
  params = jax.tree_util.tree_map(lambda p: p + 0.02, params)  # the final layer is zero-initialised
  obj = step_lib.ElfObjective(model, encoder, flow.FlowConfig.from_config(c), num_groups=1)
  frozen = step_lib.FrozenInputs(enc_params)
  loss = jax.jit(lambda b: step_lib.compute_loss(params, frozen, b, jax.random.key(5), obj)[0])
  on_the_fly = {k: v for k, v in batch.items() if k != "latents"}
  np.testing.assert_allclose(float(loss(batch)), float(loss(on_the_fly)), rtol=1e-5)
  # The latents reach the loss: corrupting them changes it.
  corrupted = dict(batch, latents=batch["latents"] + 1.0)
  assert abs(float(loss(corrupted)) - float(loss(batch))) > 1e-3


def test_cache_for_another_config_is_refused(built):
  c, out, _ = built
  c = _config(packing=c.data.packing)
  c.data.latent_cache_dir = out
  c.data.max_length = 24
  with pytest.raises(ValueError, match="max_length"):
    latent_cache.open_cache(c, c.data.split)
  with pytest.raises(FileNotFoundError, match="python -m elf_jax.run.cache_latents"):
    latent_cache.CachedRows(out + "/missing")
