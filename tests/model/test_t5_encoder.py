"""The Flax T5 encoder against Hugging Face's PyTorch T5 (tiny random checkpoints written here), its mask builder
and its weight import from Hugging Face checkpoints (the official ELF encoder pickle: tests/weights/test_encoder.py)."""
import json
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from elf_jax import config as elf_config
from elf_jax.model import t5_encoder
from elf_jax.weights import encoder as encoder_weights

B, S = 3, 12
TINY = dict(vocab_size=100, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64)


def _hf_config(**overrides):
  return transformers.T5Config(**{**TINY, **overrides}, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory):
  """A seeded tiny `T5EncoderModel`, saved as safetensors and as pytorch_model.bin."""
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(_hf_config()).eval()
  dirs = {}
  for fmt, safe in (("safetensors", True), ("bin", False)):
    dirs[fmt] = tmp_path_factory.mktemp(fmt)
    model.save_pretrained(dirs[fmt], safe_serialization=safe)
  return model, dirs


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY["vocab_size"], (B, S)).astype(np.int32)
  lengths = np.array([S, 9, 5])
  valid = np.arange(S)[None, :] < lengths[:, None]
  return ids, valid


def _flax(params, config, ids, mask, dtype=jnp.float32):
  apply = jax.jit(t5_encoder.T5Encoder(config, dtype).apply)
  return np.asarray(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))


def _torch(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=mask).last_hidden_state.numpy()


def _additive_4d(mask3d):
  """(B, S, S) bool -> (B, 1, S, S) float additive mask. transformers 5 no longer expands 3-D masks (it passes
  4-D masks through unchanged and the eager kernel adds them to the scores), so this is the faithful route."""
  mask = torch.as_tensor(np.array(mask3d))[:, None]
  return torch.where(mask, 0.0, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_padding_mask_matches_hf(hf_encoder, fmt):
  model, dirs = hf_encoder
  config, params = encoder_weights.load_hf_t5_encoder(str(dirs[fmt]))
  assert config == t5_encoder.T5EncoderConfig(**TINY)
  ids, valid = _inputs()
  ours = _flax(params, config, ids, valid)
  ref = _torch(model, ids, torch.as_tensor(valid, dtype=torch.long))
  # Padding rows attend to the valid columns in both implementations, so every position is compared.
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  # The same padding expressed as a full (B, S, S) mask gives the same result.
  np.testing.assert_allclose(_flax(params, config, ids, t5_encoder.make_encoder_mask(valid)), ours, atol=1e-6)


def test_conditional_mask_matches_hf(hf_encoder):
  model, dirs = hf_encoder
  config, params = encoder_weights.load_hf_t5_encoder(str(dirs["safetensors"]))
  ids, valid = _inputs(1)
  cond = np.arange(S)[None, :] < np.array([4, 3, 2])[:, None]
  mask = t5_encoder.make_encoder_mask(valid, cond, np.array([False, True, False]))
  ours = _flax(params, config, ids, mask)
  ref = _torch(model, ids, _additive_4d(mask))
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  # The mask matters: target rows of the dropped example differ from the undropped encoding.
  undropped = _flax(params, config, ids, t5_encoder.make_encoder_mask(valid, cond))
  assert np.abs(undropped[1, 3:9] - ours[1, 3:9]).min() > 1e-4
  np.testing.assert_array_equal(undropped[[0, 2]], ours[[0, 2]])


def test_full_gated_sharded_checkpoint_matches_hf(tmp_path):
  """A T5ForConditionalGeneration (T5 v1.1 gated-GELU) saved in several safetensors shards: only the encoder is read."""
  torch.manual_seed(1)
  model = transformers.T5ForConditionalGeneration(_hf_config(feed_forward_proj="gated-gelu")).eval()
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  config, params = encoder_weights.load_hf_t5_encoder(str(tmp_path))
  assert config.feed_forward_proj == "gated-gelu"
  ids, valid = _inputs(2)
  ref = _torch(model.get_encoder(), ids, torch.as_tensor(valid, dtype=torch.long))
  np.testing.assert_allclose(_flax(params, config, ids, valid), ref, atol=1e-5, rtol=0)


def test_relative_position_buckets_match_hf():
  attention = transformers.models.t5.modeling_t5.T5Attention
  length = 400
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  for num_buckets, max_distance in ((32, 128), (16, 40), (8, 10)):
    ref = attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                              max_distance=max_distance)
    ours = t5_encoder.relative_position_buckets(length, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_bfloat16_compute_close_to_float32(hf_encoder):
  _, dirs = hf_encoder
  config, params = encoder_weights.load_hf_t5_encoder(str(dirs["safetensors"]))
  ids, valid = _inputs()
  full = _flax(params, config, ids, valid)
  half = _flax(params, config, ids, valid, jnp.bfloat16)
  assert half.dtype == np.float32
  diff = np.abs(half - full)
  assert diff.max() < 0.05 and diff.mean() < 0.01
  assert diff.mean() > 1e-4  # bfloat16 is really used


def test_fully_masked_rows_are_finite():
  config = t5_encoder.T5EncoderConfig(**TINY)
  params = t5_encoder.random_t5_encoder_params(config, 0)
  ids, valid = _inputs()
  valid[1] = False  # an example with no valid token at all
  out = _flax(params, config, ids, t5_encoder.make_encoder_mask(valid))
  assert np.isfinite(out).all()


def test_make_encoder_mask_hand_written():
  valid = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  cond = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  got = np.asarray(t5_encoder.make_encoder_mask(valid, cond, np.array([False, True])))
  # Example 0 (condition kept): condition rows see condition columns 0-1; target and padding rows see 0-3.
  ex0 = [[1, 1, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0]] * 3
  # Example 1 (condition dropped): condition row sees column 0; target and padding rows see target columns 1-2.
  ex1 = [[1, 0, 0, 0, 0]] + [[0, 1, 1, 0, 0]] * 4
  np.testing.assert_array_equal(got, np.array([ex0, ex1], bool))
  unconditional = np.asarray(t5_encoder.make_encoder_mask(valid))
  np.testing.assert_array_equal(unconditional, np.broadcast_to(valid[:, None, :], (2, 5, 5)))
  with pytest.raises(ValueError, match="drop_condition needs cond_mask"):
    t5_encoder.make_encoder_mask(valid, drop_condition=np.array([True, False]))


def test_mismatched_checkpoint_lists_every_problem(hf_encoder, tmp_path):
  _, dirs = hf_encoder
  tensors = safetensors.numpy.load_file(dirs["safetensors"] / "model.safetensors")
  del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
  tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 63), np.float32)
  tensors["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  shutil.copy(dirs["safetensors"] / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError) as err:
    encoder_weights.load_hf_t5_encoder(str(tmp_path))
  message = str(err.value)
  assert "missing encoder.block.1.layer.0.SelfAttention.k.weight" in message
  assert "encoder.block.0.layer.1.DenseReluDense.wo.weight has shape (32, 63), expected (32, 64)" in message
  assert "unexpected encoder.block.2.layer.0.layer_norm.weight" in message


def test_random_params_are_seeded_and_shaped_like_checkpoints(hf_encoder):
  _, dirs = hf_encoder
  config, loaded = encoder_weights.load_hf_t5_encoder(str(dirs["safetensors"]))
  a, b, c = (t5_encoder.random_t5_encoder_params(config, seed) for seed in (0, 0, 1))
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(a) == shapes(loaded)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, b)))
  assert not (a["block_0"]["attention"]["q"]["kernel"] == c["block_0"]["attention"]["q"]["kernel"]).any()
  # Hugging Face's init scale: unit-variance embeddings, q std (d_model * d_kv) ** -0.5.
  assert abs(float(a["shared"]["embedding"].std()) - 1.0) < 0.1
  assert abs(float(a["block_0"]["attention"]["q"]["kernel"].std()) * (32 * 8) ** 0.5 - 1.0) < 0.15


def test_config_from_hf_and_errors(tmp_path, monkeypatch):
  hf = _hf_config(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-5)
  config = t5_encoder.T5EncoderConfig.from_hf_config(hf)
  assert config == t5_encoder.T5EncoderConfig.from_hf_config(json.loads(hf.to_json_string()))
  assert (config.layer_norm_eps, config.feed_forward_proj) == (1e-5, "gated-gelu")
  with pytest.raises(ValueError, match="gated-silu"):
    t5_encoder.T5EncoderConfig(**TINY, feed_forward_proj="gated-silu")
  with pytest.raises(FileNotFoundError, match="no weights"):
    (tmp_path / "config.json").write_text(hf.to_json_string())
    encoder_weights.load_hf_t5_encoder(str(tmp_path))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(elf_config.ConfigError, match="--config.encoder.name_or_path=DIR"):
    encoder_weights.load_hf_t5_encoder("no-such-org/no-such-t5")
