"""The Flax T5 encoder against Hugging Face's PyTorch T5 (tiny random checkpoints written here), its mask builder
and its weight import; the official ELF encoder pickle against the reference_elf_train fixture."""
import json
import os
import pickle
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tests.conftest import fixture_config, relative_error
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


# --------------------------------------------------------------------------------------------------------------
# The official ELF encoder pickle (reference_elf_train: encoder_params.pkl and the official step's encoder draws).

CASES = ("uncond_pad", "cond_eos")


@pytest.fixture(scope="module")
def official_pkl(train_fixture_dir):
  """The fixture's T5 encoder in the official encoder-checkpoint format (a numpy pickle)."""
  return train_fixture_dir / "encoder_params.pkl"


@pytest.fixture(scope="module")
def train_fixture(train_fixture_dir):
  """(config.json, reference.npz) of the reference_elf_train fixture."""
  return fixture_config(train_fixture_dir), np.load(train_fixture_dir / "reference.npz")


@pytest.fixture(scope="module")
def official_encoder(train_fixture, official_pkl):
  """`build_encoder` of a config whose encoder.name_or_path is the fixture's encoder_params.pkl."""
  fixture_config, _ = train_fixture
  config = elf_config.base_config()
  config.encoder.name_or_path = str(official_pkl)
  config.encoder.dim = fixture_config["dims"]["C"]
  config.encoder.latent_mean = fixture_config["latent_mean"]
  config.encoder.latent_std = fixture_config["latent_std"]
  return encoder_weights.build_encoder(config)


def _case_masks(ref, case):
  valid = ref[f"{case}/attention_mask"] > 0
  cond = ref[f"{case}/cond_seq_mask"] > 0
  return valid, cond, ref[f"{case}/label_drop_mask"]


def test_official_pickle_dims_from_shapes(train_fixture, official_encoder):
  fixture_config, _ = train_fixture
  dims, settings = fixture_config["dims"], fixture_config["encoder"]
  encoder, _ = official_encoder
  assert encoder.t5.config == t5_encoder.T5EncoderConfig(
      vocab_size=dims["V"], d_model=dims["C"], num_layers=dims["enc_layers"], num_heads=dims["enc_heads"],
      d_kv=dims["enc_dkv"], d_ff=dims["enc_dff"],
      relative_attention_num_buckets=settings["relative_attention_num_buckets"],
      relative_attention_max_distance=settings["relative_attention_max_distance"],
      layer_norm_eps=settings["layer_norm_epsilon"],
      feed_forward_proj="gated-gelu" if settings["is_gated_act"] else "relu")


@pytest.mark.parametrize("case", CASES)
def test_official_pickle_reproduces_latents(train_fixture, official_encoder, case):
  _, ref = train_fixture
  encoder, params = official_encoder
  mask = ref[f"{case}/draws/encoder_attention_mask_after_drop"]
  raw = jax.jit(encoder.t5.apply)({"params": params}, ref[f"{case}/input_ids"], mask)
  assert relative_error(raw, ref[f"{case}/draws/latents_raw"]) <= 1e-5
  np.testing.assert_allclose(raw, ref[f"{case}/draws/latents_raw"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_make_encoder_mask_matches_official(train_fixture, case):
  _, ref = train_fixture
  valid, cond, drop = _case_masks(ref, case)
  np.testing.assert_array_equal(np.asarray(t5_encoder.make_encoder_mask(valid, cond)),
                                ref[f"{case}/encoder_attention_mask"] > 0)
  np.testing.assert_array_equal(np.asarray(t5_encoder.make_encoder_mask(valid, cond, drop)),
                                ref[f"{case}/draws/encoder_attention_mask_after_drop"] > 0)


@pytest.mark.parametrize("case", CASES)
def test_latent_encoder_gives_official_x0(train_fixture, official_encoder, case):
  _, ref = train_fixture
  encoder, params = official_encoder
  valid, cond, drop = _case_masks(ref, case)
  x0 = jax.jit(encoder.encode)(params, ref[f"{case}/input_ids"], valid, cond, drop)
  assert relative_error(x0, ref[f"{case}/draws/x0"]) <= 1e-5
  dropped_condition = (drop[:, None] & cond)
  if dropped_condition.any():
    assert not np.asarray(x0)[dropped_condition].any()


@pytest.mark.parametrize("protocol", range(6))
def test_official_pickle_loads_under_every_protocol(tmp_path, official_pkl, protocol):
  """The fixture's encoder params re-saved with pickle protocols 0-5 (still a plain dict of numpy arrays) load equal,
  numpy scalars included."""
  tree = encoder_weights.read_numpy_pickle(str(official_pkl))
  tree = {"params": tree, "scalars": [np.float32(1.5), np.int64(-3)], "empty": np.zeros((0, 2), np.bool_)}
  (tmp_path / "p.pkl").write_bytes(pickle.dumps(tree, protocol=protocol))
  loaded = encoder_weights.read_numpy_pickle(str(tmp_path / "p.pkl"))
  jax.tree.map(np.testing.assert_array_equal, loaded, tree)
  assert loaded["scalars"][0].dtype == np.float32 and loaded["empty"].shape == (0, 2)


def test_the_protocol_0_helpers_do_only_their_job(tmp_path):
  """`_codecs.encode` and `bytes` are allowed for latin-1 text and byte lists only: a payload calling them with
  another codec or a size is refused."""
  def payload(opcodes: bytes) -> bytes:
    return b"\x80\x02" + opcodes + b"."
  cases = {"rot13": b"c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R",
           "size": b"c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R"}
  for name, opcodes in cases.items():
    (tmp_path / f"{name}.pkl").write_bytes(payload(opcodes))
    with pytest.raises(pickle.UnpicklingError, match=f"{name}.pkl: refused"):
      encoder_weights.read_numpy_pickle(str(tmp_path / f"{name}.pkl"))


def test_official_pickle_numpy1_names(tmp_path, official_pkl):
  """Files pickled under numpy 1 name numpy.core.multiarray._reconstruct; protocol 3 spells globals as text."""
  tree = encoder_weights.read_numpy_pickle(str(official_pkl))
  data = pickle.dumps(tree, protocol=3)
  assert b"numpy._core.multiarray\n" in data
  (tmp_path / "old.pkl").write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
  config, params = encoder_weights.load_official_t5_encoder(str(tmp_path / "old.pkl"))
  reference_config, reference_params = encoder_weights.load_official_t5_encoder(str(official_pkl))
  assert config == reference_config
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, reference_params))


class _CreatesFile:
  """A pickle payload that would create `path` when unpickled by a plain `pickle.load`."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


class _Custom:
  pass


def test_official_pickle_refuses_other_globals(tmp_path):
  marker = tmp_path / "executed"
  payloads = {"system.pkl": {"params": _CreatesFile(marker)}, "custom.pkl": {"params": {"x": _Custom()}}}
  for name, payload in payloads.items():
    (tmp_path / name).write_bytes(pickle.dumps(payload))
  with pytest.raises(pickle.UnpicklingError, match=f"system.pkl: refused to load {os.system.__module__}.system"):
    encoder_weights.load_official_t5_encoder(str(tmp_path / "system.pkl"))
  assert not marker.exists()
  with pytest.raises(pickle.UnpicklingError, match=r"refused to load .*_Custom: .* only dicts, lists, numpy"):
    encoder_weights.load_official_t5_encoder(str(tmp_path / "custom.pkl"))
  (tmp_path / "text.pkl").write_text("not a pickle")
  with pytest.raises(pickle.UnpicklingError, match="text.pkl"):
    encoder_weights.load_official_t5_encoder(str(tmp_path / "text.pkl"))


def test_official_pickle_wrong_structure_names_the_problem(tmp_path, official_pkl):
  tree = encoder_weights.read_numpy_pickle(str(official_pkl))
  encoder = tree["params"]["encoder"]
  del encoder["final_layer_norm"]
  encoder["block_1"]["layer_0"]["SelfAttention"]["k"]["kernel"] = np.zeros((3, 3), np.float32)
  encoder["extra"] = {"weight": np.ones(2, np.float32)}
  (tmp_path / "broken.pkl").write_bytes(pickle.dumps(tree))
  with pytest.raises(ValueError) as err:
    encoder_weights.load_official_t5_encoder(str(tmp_path / "broken.pkl"))
  message = str(err.value)
  assert "missing encoder/final_layer_norm/weight" in message
  assert "encoder/block_1/layer_0/SelfAttention/k/kernel has shape (3, 3)" in message
  assert "unexpected encoder/extra/weight (2,)" in message

  del tree["params"]["shared"]
  (tmp_path / "no_embedding.pkl").write_bytes(pickle.dumps(tree))
  with pytest.raises(ValueError, match="shared/embedding .* is missing"):
    encoder_weights.load_official_t5_encoder(str(tmp_path / "no_embedding.pkl"))
  (tmp_path / "list.pkl").write_bytes(pickle.dumps([np.zeros(2)]))
  with pytest.raises(ValueError, match="holds a list"):
    encoder_weights.load_official_t5_encoder(str(tmp_path / "list.pkl"))
