"""Checkpoints and encoders named by Hugging Face hub id, resolved offline by the real huggingface_hub from a hub
cache laid out here (models--ORG--NAME/refs/main → snapshots/<revision>/...) holding the shared fixtures in the
official repositories' layouts; and the one-line error for anything that is no ELF checkpoint."""
import shutil
import zipfile

import flax.linen as nn
import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elf_jax import config as elf_config
from elf_jax import hub, recipes
from elf_jax.config import ConfigError
from elf_jax.model.elf import ModelConfig, init_params
from elf_jax.weights import encoder as encoder_weights
from elf_jax.weights import published, torch_format

from tests.conftest import fixture_config, tiny_fixture_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """add(repo_id, {path in the repository: source file or folder}) lays a repository out in an offline hub cache."""
  cache = tmp_path / "hub"
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

  def add(repo_id, files):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, source in files.items():
      target = repo / "snapshots" / REVISION / name
      target.parent.mkdir(parents=True, exist_ok=True)
      (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return repo / "snapshots" / REVISION

  return add


@pytest.fixture(scope="module")
def tiny(tiny_fixture_dir):
  """(model, parameter shapes, reference outputs) of the reference_elf_tiny fixture."""
  model = tiny_fixture_model(tiny_fixture_dir)
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  return model, shapes, np.load(tiny_fixture_dir / "reference.npz")


def _assert_reference_outputs(model, params, ref):
  """x̂ and decoder logits of `params` equal the reference network's (1e-5, as tests/model/test_elf.py)."""
  x, t, w, mask = ref["x"], ref["t"], ref["w"], ref["mask"]
  np.testing.assert_allclose(model.apply({"params": params}, x, t, w, mask), ref["out_den"], atol=1e-5, rtol=0)
  logits = model.apply({"params": params}, x, jnp.ones_like(t), w, mask, decode=True)
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=0)


def test_official_jax_repository_by_id_takes_the_newest_step(hub_cache, tiny, tiny_fixture_dir, tmp_path):
  """A snapshot of an official JAX repository (a folder of checkpoint_<step> files) by id: the newest step's EMA."""
  model, shapes, ref = tiny
  older = tmp_path / "older"
  older.write_bytes(b"\x81\xa1x\x01")  # an older step that would not load: it must not be the one read
  hub_cache("embedded-language-flows/ELF-T-owt",
            {"checkpoint_3": older, "checkpoint_7": tiny_fixture_dir / "checkpoint_7"})
  params = published.load_params_from("embedded-language-flows/ELF-T-owt", shapes)
  _assert_reference_outputs(model, params, ref)
  assert ModelConfig.from_params(published.load_params_from("embedded-language-flows/ELF-T-owt")).depth == 2


def test_official_pytorch_repository_and_old_orbax_layout_by_id(hub_cache, tiny, tiny_fixture_dir, tmp_path):
  """The `-torch` twin (checkpoint_<step> torch.save payloads) and the older layout the official loader falls back
  to (checkpoint_<step> an orbax folder), each by id, and a file inside a repository by hub path."""
  model, shapes, ref = tiny
  payload = tmp_path / "checkpoint_7"
  torch_format.export_torch(payload, published.load_published_elf(tiny_fixture_dir / "checkpoint_7", "raw"),
                            published.load_published_elf(tiny_fixture_dir / "checkpoint_7", "ema"))
  hub_cache("embedded-language-flows/ELF-T-owt-torch", {"checkpoint_7": payload})
  hub_cache("org/old-layout", {"checkpoint_7": tiny_fixture_dir / "orbax_checkpoint_7"})
  hub_cache("org/bundle", {"runs/b/checkpoint_7": tiny_fixture_dir / "checkpoint_7"})
  for source in ("embedded-language-flows/ELF-T-owt-torch", "org/old-layout", "org/bundle/runs/b/checkpoint_7",
                 "org/bundle/runs/b"):
    _assert_reference_outputs(model, published.load_params_from(source, shapes), ref)


def test_encoder_pickle_by_hub_path(hub_cache, train_fixture_dir):
  """encoder.name_or_path = ORG/NAME/file.pkl reads the cached pickle, as a local path to it does."""
  encoder_pkl = train_fixture_dir / "encoder_params.pkl"
  hub_cache("org/encoder", {"enc/encoder_params.pkl": encoder_pkl})
  config = elf_config.base_config()
  config.encoder.dim = fixture_config(train_fixture_dir)["dims"]["C"]  # the fixture encoder's width
  config.encoder.name_or_path = str(encoder_pkl)
  _, local = encoder_weights.build_encoder(config)
  config.encoder.name_or_path = "org/encoder/enc/encoder_params.pkl"
  _, by_id = encoder_weights.build_encoder(config)
  assert jax.tree.structure(local) == jax.tree.structure(by_id)
  for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(by_id)):
    np.testing.assert_array_equal(a, b)


def test_the_official_encoder_is_known_without_fetching(hub_cache):
  """The recipes name the authors' pickle by hub path; an abstract build (--mode=compile) knows its architecture
  with nothing cached, a real one stops offline with one line naming the field."""
  config = recipes.owt("b")
  assert config.encoder.name_or_path == encoder_weights.OFFICIAL_ENCODER
  _, shapes = encoder_weights.build_encoder(config, abstract=True)
  assert shapes["shared"]["embedding"].shape == (32128, 512)
  with pytest.raises(ConfigError) as err:
    encoder_weights.build_encoder(config)
  assert "\n" not in str(err.value)
  assert str(err.value).startswith(f"encoder.name_or_path={encoder_weights.OFFICIAL_ENCODER!r}: no such local")


def test_an_id_that_is_not_cached_is_one_line(hub_cache):
  with pytest.raises(ConfigError) as err:
    published.load_params_from("embedded-language-flows/ELF-B-owt", field="distill.teacher")
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith("distill.teacher='embedded-language-flows/ELF-B-owt': no such local or gs:// path, "
                            "and fetching it as a Hugging Face hub id failed")
  assert "--config.distill.teacher=DIR" in message


def _random_bytes(path):
  path.write_bytes(np.random.default_rng(0).bytes(4096))


def _text_file(path):
  path.write_text("these are not the weights you are looking for\n")


def _empty_folder(path):
  path.mkdir()


def _foreign_zip(path):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("readme.txt", "a zip, but no torch.save payload")


@pytest.mark.parametrize("make, found", [
    (_random_bytes, "4096-byte file that is neither a torch.save zip, a safetensors file nor a flax msgpack dict"),
    (_text_file, "file that is neither a torch.save zip, a safetensors file nor a flax msgpack dict"),
    (_empty_folder, "an empty folder"),
    (_foreign_zip, "looks like a torch checkpoint but cannot be read"),
    (None, "no such file or folder"),
])
def test_anything_else_is_one_line_naming_the_formats_tried(tmp_path, make, found):
  """Random bytes, a text file, an empty folder, a zip that is no torch.save payload, a missing path: one line
  naming the field and (for what exists) every format tried."""
  path = tmp_path / "thing"
  if make:
    make(path)
  with pytest.raises(ConfigError) as err:
    published.load_params_from(str(path))
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"init_from={str(path)!r}: ") and found in message, message
  if make:
    assert message.endswith("; ".join(published.FORMATS) + ".")


def test_hub_id_grammar():
  assert hub.hub_id("t5-small") == ("t5-small", "")
  assert hub.hub_id("org/name") == ("org/name", "")
  assert hub.hub_id("org/name/sub/file.pkl") == ("org/name", "sub/file.pkl")
  for path in ("/abs/dir", "./rel", "~/x", "gs://bucket/run", ""):
    assert hub.hub_id(path) is None


def test_official_checkpoints_map_to_their_recipes():
  for repo, (depth, conditional) in {"embedded-language-flows/ELF-B-owt": (12, False),
                                     "embedded-language-flows/ELF-L-owt-torch": (32, False),
                                     "embedded-language-flows/ELF-B-de-en": (12, True)}.items():
    config = recipes.official_recipe(repo)
    assert (config.model.depth, config.data.conditional) == (depth, conditional)
  assert recipes.official_recipe("embedded-language-flows/ELF-B-de-en").data.max_length == 128
  assert recipes.official_recipe("someone/ELF-B-owt") is None
