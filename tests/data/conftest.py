"""The synthetic language, its word tokenizer and the small data configs shared by the tests of the data layer."""
import pytest

from elf_jax.config import base_config
from elf_jax.data import synthetic
from elf_jax.data import tokenizer as tokenizer_lib

S = 16


@pytest.fixture(scope="module")
def language():
  return synthetic.SyntheticLanguage(seed=5, words_per_class=3)


@pytest.fixture(scope="module")
def tok(language):
  return tokenizer_lib.load_tokenizer("synthetic", language)


def data_config(**data):
  """The base config on the synthetic language: S-token rows, 64 sentences, no shuffling, batch 4; `data` overrides
  fields of `config.data`."""
  c = base_config()
  c.data.tokenizer = "synthetic"
  c.data.max_length = S
  c.data.synthetic_num_sentences = 64
  c.data.shuffle = False
  c.optim.global_batch_size = 4
  c.data.update(data)
  return c


def encode(tok, text):
  """The ids the pipeline takes from text: no special tokens (no EOS), as the reference tokenizes raw text."""
  return tok(text, add_special_tokens=False)["input_ids"]


def save_hf_dataset(directory, columns=None, **splits):
  """save_to_disk of `datasets.Dataset.from_dict(columns)` (two shards), or of a DatasetDict {split: columns}."""
  datasets = pytest.importorskip("datasets")
  if columns is not None:
    datasets.Dataset.from_dict(columns).save_to_disk(str(directory), num_shards=2)
  else:
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(directory))
