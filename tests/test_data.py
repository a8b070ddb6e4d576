"""Tokenizers, record sources and the grain pipeline."""
import json
import pickle
import zlib

import numpy as np
import pyarrow as pa
import pytest
import transformers

from elf_jax.config import base_config
from elf_jax.data import pipeline
from elf_jax.data import sources
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.data import synthetic

S = 16


@pytest.fixture(scope="module")
def language():
  return synthetic.SyntheticLanguage(seed=5, words_per_class=3)


@pytest.fixture(scope="module")
def tok(language):
  return tokenizer_lib.load_tokenizer("synthetic", language)


def _config(**data):
  c = base_config()
  c.data.tokenizer = "synthetic"
  c.data.max_length = S
  c.data.synthetic_num_sentences = 64
  c.data.shuffle = False
  c.optim.global_batch_size = 4
  c.data.update(data)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _encode(tok, text):
  return tok(text)["input_ids"]


def _write_arrow_dataset(directory, columns):
  """A directory laid out as Hugging Face `save_to_disk` writes it (two IPC stream shards)."""
  directory.mkdir(parents=True)
  table = pa.table(columns)
  half = table.num_rows // 2
  files = []
  for i, part in enumerate((table.slice(0, half), table.slice(half))):
    name = f"data-{i:05d}-of-00002.arrow"
    with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
      writer.write_table(part)
    files.append({"filename": name})
  (directory / "state.json").write_text(json.dumps({"_data_files": files, "_split": None}))
  (directory / "dataset_info.json").write_text("{}")


# Tokenizer.

def test_word_tokenizer_ids_and_round_trip(language, tok, tmp_path):
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert len(tok) == len(language.vocabulary) + 3
  for sentence in language.sample(20, np.random.default_rng(0)):
    ids = _encode(tok, sentence)
    assert ids[-1] == 1 and len(ids) == len(sentence.split()) + 1
    assert ids[:-1] == [3 + language.vocabulary.index(w) for w in sentence.split()]
    assert tok.decode(ids, skip_special_tokens=True) == sentence
  assert _encode(tok, "the zebra") == [3 + language.vocabulary.index("the"), 2, 1]
  tokenizer_lib.build_word_tokenizer(language.vocabulary, save_dir=str(tmp_path))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert _encode(reloaded, "the cat sees the dog") == _encode(tok, "the cat sees the dog")
  assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)


def test_load_tokenizer_errors():
  with pytest.raises(ValueError, match="language"):
    tokenizer_lib.load_tokenizer("synthetic")
  with pytest.raises(OSError, match="config.data.tokenizer"):
    tokenizer_lib.load_tokenizer("/nonexistent/tokenizer_dir")
  with pytest.raises(ValueError, match="distinct"):
    tokenizer_lib.build_word_tokenizer(["a", "a"])


# Sources.

def test_synthetic_source_is_deterministic_random_access(language):
  c = _config()
  train = sources.make_source(c.data, "train", language)
  again = sources.make_source(c.data, "train", language)
  valid = sources.make_source(c.data, "validation", language)
  assert len(train) == 64
  assert [train[i] for i in (5, 0, 63)] == [again[i] for i in (5, 0, 63)]
  assert [train[i]["text"] for i in range(64)] != [valid[i]["text"] for i in range(64)]
  expected = language.sample(1, np.random.default_rng([c.data.synthetic_seed, zlib.crc32(b"train"), 5]))
  assert train[5]["text"] == expected[0]
  with pytest.raises(IndexError):
    train[64]


def test_text_and_jsonl_sources(tmp_path):
  (tmp_path / "train.txt").write_text("first line\n\nsecond line\n")
  text = sources.make_source(_config(source="text", path=str(tmp_path / "{split}.txt")).data, "train")
  assert list(text) == [{"text": "first line"}, {"text": "second line"}]
  rows = [{"input": "a b", "output": "c"}, {"input": "d", "output": "e f"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  jsonl = sources.make_source(_config(source="jsonl", path=str(tmp_path / "pairs.jsonl"), conditional=True).data,
                              "train")
  assert len(jsonl) == 2 and jsonl[1] == {"input": "d", "output": "e f"}
  with pytest.raises(KeyError, match="text"):
    sources.make_source(_config(source="jsonl", path=str(tmp_path / "pairs.jsonl")).data, "train")


def test_arrow_source_text_ids_and_dataset_dict(tmp_path):
  _write_arrow_dataset(tmp_path / "plain", {"text": ["a b", "c", "d e", "f"], "other": [1, 2, 3, 4]})
  plain = sources.make_source(_config(source="hf_arrow", path=str(tmp_path / "plain")).data, "train")
  assert [r["text"] for r in plain] == ["a b", "c", "d e", "f"]
  assert pickle.loads(pickle.dumps(plain))[3] == {"text": "f"}
  ids = [[5, 6, 1], [7, 1], [8, 9, 10], [11]]
  _write_arrow_dataset(tmp_path / "dict" / "validation", {"input_ids": ids})
  (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
  tokenized = sources.make_source(_config(source="hf_arrow", path=str(tmp_path / "dict")).data, "validation")
  assert len(tokenized) == 4
  for record, expected in zip(tokenized, ids):
    assert record["text"].dtype == np.int32 and record["text"].tolist() == expected
  _write_arrow_dataset(tmp_path / "pairs", {"document": ["x y", "z"], "summary": ["x", "y"]})
  pairs = sources.make_source(
      _config(source="hf_arrow", path=str(tmp_path / "pairs"), conditional=True, input_key="document",
              output_key="summary").data, "train")
  assert pairs[1] == {"input": "z", "output": "y"}


@pytest.mark.parametrize("kind", ["text", "jsonl", "hf_arrow"])
def test_missing_path_is_a_clear_error(kind, tmp_path):
  missing = str(tmp_path / "nowhere" / "{split}.data")
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path.*nowhere/validation\.data"):
    sources.make_source(_config(source=kind, path=missing).data, "validation")


def test_tfds_array_record_source(tmp_path):
  """A tiny TFDS dataset built here in ArrayRecord format, read through tfds.data_source."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class ElfTinyPairs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"document": tfds.features.Text(), "summary": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"document": f"document {i}", "summary": f"summary {i}"}

  ElfTinyPairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = _config(source="tfds", path="elf_tiny_pairs", conditional=True, input_key="document", output_key="summary")
  c.data.data_dir = str(tmp_path)
  source = sources.make_source(c.data, "train")
  assert sorted((r["input"], r["output"]) for r in source) == [(f"document {i}", f"summary {i}") for i in range(4)]
  c.data.path = "elf_no_such_dataset"
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    sources.make_source(c.data, "train")


@pytest.mark.parametrize("name, record, expected", [
    ("xsum", {"document": b"long text", "summary": b"short", "id": b"7"}, {"input": "long text", "output": "short"}),
    ("wmt14_translate/de-en", {"de": b"hallo welt", "en": b"hello world"},
     {"input": "hallo welt", "output": "hello world"}),
])
def test_tfds_known_field_mapping_with_a_fake_source(monkeypatch, name, record, expected):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  monkeypatch.setattr(tfds, "data_source", lambda n, **kw: calls.append((n, kw)) or [record])
  source = sources.make_source(_config(source="tfds", path=name, conditional=True).data, "validation")
  assert source[0] == expected
  assert calls == [(name, {"split": "validation", "data_dir": None, "download": False})]


# Pipeline.

def test_unconditional_pad_mode_rows(language, tok):
  c = _config()
  batches = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 2)
  source = sources.make_source(c.data, "train", language)
  for k, b in enumerate(batches):
    assert b["ids"].shape == (4, S) and b["ids"].dtype == np.int32
    for name in ("valid", "cond_mask", "loss_mask"):
      assert b[name].shape == (4, S) and b[name].dtype == bool
    assert not b["cond_mask"].any() and (b["loss_mask"] == b["valid"]).all()
    for row in range(4):
      expected = _encode(tok, source[4 * k + row]["text"])
      n = len(expected)
      assert b["ids"][row, :n].tolist() == expected and (b["ids"][row, n:] == 0).all()
      assert b["valid"][row].tolist() == [True] * n + [False] * (S - n)


def test_unconditional_eos_mode_and_truncation(language, tok):
  c = _config(max_length=5)
  c.flow.pad_token = "eos"
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  source = sources.make_source(c.data, "train", language)
  assert b["valid"].all() and b["loss_mask"].all() and not b["cond_mask"].any()
  for row in range(4):
    full = _encode(tok, source[row]["text"])
    expected = full if len(full) <= 5 else full[:4] + [1]
    assert b["ids"][row].tolist() == expected + [1] * (5 - len(expected))


def test_packing_concatenates_documents(language, tok):
  c = _config(packing=True)
  batches = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 2)
  source = sources.make_source(c.data, "train", language)
  stream = [i for r in range(40) for i in _encode(tok, source[r]["text"])]
  packed = np.concatenate([b["ids"].reshape(-1) for b in batches])
  assert packed.tolist() == stream[:len(packed)]
  assert all(b["valid"].all() and b["loss_mask"].all() and not b["cond_mask"].any() for b in batches)


def _conditional_config(tmp_path, pad_token):
  rows = [{"input": "the cat sees the dog today", "output": "the dog sleeps"},
          {"input": "tom", "output": "the big red ball"},
          {"input": "a b c d e f", "output": "x"},
          {"input": "she runs", "output": "the cat near the park sleeps again today"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  c = _config(source="jsonl", path=str(tmp_path / "pairs.jsonl"), conditional=True, max_length=8,
              max_condition_length=4)
  c.flow.pad_token = pad_token
  return c, rows


@pytest.mark.parametrize("pad_token", ["pad", "eos"])
def test_conditional_jsonl_rows(tmp_path, tok, pad_token):
  c, rows = _conditional_config(tmp_path, pad_token)
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  pad = 1 if pad_token == "eos" else 0
  for row, record in enumerate(rows):
    cond = _encode(tok, record["input"])
    cond = cond if len(cond) <= 4 else cond[:3] + [1]
    target = _encode(tok, record["output"])
    target = target if len(target) <= 8 - len(cond) else target[:8 - len(cond) - 1] + [1]
    n = len(cond) + len(target)
    assert b["ids"][row].tolist() == cond + target + [pad] * (8 - n)
    assert b["cond_mask"][row].tolist() == [True] * len(cond) + [False] * (8 - len(cond))
    valid = [True] * 8 if pad_token == "eos" else [True] * n + [False] * (8 - n)
    assert b["valid"][row].tolist() == valid
    assert (b["loss_mask"][row] == (b["valid"][row] & ~b["cond_mask"][row])).all()


def test_conditional_length_errors(tmp_path, tok):
  c, _ = _conditional_config(tmp_path, "pad")
  c.data.max_condition_length = 8
  with pytest.raises(ValueError, match="max_condition_length"):
    pipeline.make_dataset(c, tok, "train")
  c.data.max_condition_length, c.data.packing = 4, True
  with pytest.raises(ValueError, match="packing"):
    pipeline.make_dataset(c, tok, "train")


def test_pretokenized_ids_get_eos(tmp_path, tok):
  _write_arrow_dataset(tmp_path / "ids", {"input_ids": [[5, 6, 1], [7], [8, 9], [10, 11, 12, 1]]})
  c = _config(source="hf_arrow", path=str(tmp_path / "ids"), max_length=4)
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  assert b["ids"].tolist() == [[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 1, 0], [10, 11, 12, 1]]


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_round_trip(language, tok, packing):
  c = _config(shuffle=True, packing=packing)
  dataset = pipeline.make_dataset(c, tok, "train", language=language, seed=3)
  it = iter(dataset)
  first = _take(it, 2)
  state = it.get_state()
  rest = _take(it, 3)
  restored = iter(pipeline.make_dataset(c, tok, "train", language=language, seed=3))
  restored.set_state(state)
  for a, b in zip(rest, _take(restored, 3)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["ids"], rest[0]["ids"])


def test_shuffle_seed_and_epochs(tmp_path):
  words = [f"w{i}" for i in range(24)]
  tok = tokenizer_lib.build_word_tokenizer(words)
  (tmp_path / "lines.txt").write_text("\n".join(words))
  c = _config(source="text", path=str(tmp_path / "lines.txt"), shuffle=True)

  def order(seed, epochs):
    batches = list(pipeline.make_dataset(c, tok, "train", seed=seed, num_epochs=epochs))
    return [int(i) - 3 for b in batches for i in b["ids"][:, 0]]

  once = order(0, 1)
  assert sorted(once) == list(range(24)) and once != list(range(24))
  assert order(0, 1) == once and order(1, 1) != once
  twice = order(0, 2)
  assert twice[:24] == once and sorted(twice[24:]) == list(range(24)) and twice[24:] != once


def test_process_shards_are_disjoint(tmp_path):
  words = [f"w{i}" for i in range(24)]
  tok = tokenizer_lib.build_word_tokenizer(words)
  (tmp_path / "lines.txt").write_text("\n".join(words))
  c = _config(source="text", path=str(tmp_path / "lines.txt"), shuffle=True)
  c.optim.global_batch_size = 6
  seen = []
  for p in range(3):
    batches = list(pipeline.make_dataset(c, tok, "train", process_index=p, process_count=3, num_epochs=1))
    assert len(batches) == 4 and all(b["ids"].shape == (2, S) for b in batches)
    seen.append({int(i) - 3 for b in batches for i in b["ids"][:, 0]})
  assert all(len(s) == 8 for s in seen) and set.union(*seen) == set(range(24))
  c.optim.global_batch_size = 4
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(c, tok, "train", process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches(language, tok):
  absl_flags = pytest.importorskip("absl.flags")
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()
  c = _config(shuffle=True)
  expected = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 3)
  c.data.num_workers = 2
  got = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 3)
  for a, b in zip(expected, got):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
