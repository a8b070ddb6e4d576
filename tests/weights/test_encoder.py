"""The official ELF encoder pickle (elf_jax.weights.encoder) against the reference_elf_train fixture (its
encoder_params.pkl and the official step's encoder draws): dimensions, latents, masks and x0, and the safe unpickler.
"""
import os
import pickle

import jax
import numpy as np
import pytest

from elf_jax import config as elf_config
from elf_jax.model import t5_encoder
from elf_jax.weights import encoder as encoder_weights

from tests.conftest import fixture_config, relative_error

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
