"""Tokenizers, record sources and the grain pipeline; rows equal the reference's collate (fixture
reference_elf_train), and the reference's pre-tokenized Hugging Face datasets are read as they are."""
import json
import pickle
import zlib

import numpy as np
import pytest
import transformers

from tests.conftest import fixture_config
from elf_jax.config import ConfigError, base_config
from elf_jax.data import pipeline
from elf_jax.data import sources
from elf_jax.data import synthetic
from elf_jax.data import tokenizer as tokenizer_lib
from elf_jax.model.t5_encoder import make_encoder_mask

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
  """The ids the pipeline takes from text: no special tokens (no EOS), as the reference tokenizes raw text."""
  return tok(text, add_special_tokens=False)["input_ids"]


def _save_hf_dataset(directory, columns=None, **splits):
  """save_to_disk of `datasets.Dataset.from_dict(columns)` (two shards), or of a DatasetDict {split: columns}."""
  datasets = pytest.importorskip("datasets")
  if columns is not None:
    datasets.Dataset.from_dict(columns).save_to_disk(str(directory), num_shards=2)
  else:
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(directory))


# Tokenizer.

def test_word_tokenizer_ids_and_round_trip(language, tok, tmp_path):
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
  assert len(tok) == len(language.vocabulary) + 3
  for sentence in language.sample(20, np.random.default_rng(0)):
    ids = tok(sentence)["input_ids"]
    assert ids[-1] == 1 and len(ids) == len(sentence.split()) + 1  # T5's convention: EOS appended by default
    assert ids[:-1] == [3 + language.vocabulary.index(w) for w in sentence.split()] == _encode(tok, sentence)
    assert tok.decode(ids, skip_special_tokens=True) == sentence
  assert tok("the zebra")["input_ids"] == [3 + language.vocabulary.index("the"), 2, 1]
  tokenizer_lib.build_word_tokenizer(language.vocabulary, save_dir=str(tmp_path))
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded("the cat sees the dog")["input_ids"] == tok("the cat sees the dog")["input_ids"]
  assert _encode(reloaded, "the cat sees the dog") == _encode(tok, "the cat sees the dog")
  assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 1)


def test_load_tokenizer_errors():
  with pytest.raises(ValueError, match="language"):
    tokenizer_lib.load_tokenizer("synthetic")
  with pytest.raises(ConfigError, match="--config.data.tokenizer=DIR"):
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
  with pytest.raises(ConfigError, match=r"pairs.jsonl:1: no field 'text'"):
    sources.make_source(_config(source="jsonl", path=str(tmp_path / "pairs.jsonl")).data, "train")


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_bad_jsonl_records_are_named_by_file_and_line(tmp_path, capsys, on_bad_record):
  """Line numbers count blank lines; malformed JSON, non-UTF-8 bytes, a missing key and a non-text value are each
  named with their line and field; "skip" trains on the rest and says how many were left out."""
  lines = [b'{"text": "a b"}', b"", b'{"text": "c"', b'{"text": "\xff\xfe"}', b'{"other": "d"}', b'{"text": [1.5]}',
           b'{"text": "e f"}']
  (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  c = _config(source="jsonl", path=str(tmp_path / "train.jsonl"), on_bad_record=on_bad_record)
  if on_bad_record == "error":
    with pytest.raises(ConfigError) as err:
      sources.make_source(c.data, "train")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'train.jsonl'}:3: not valid JSON")
    assert "(and 3 more bad records)" in message and "--config.data.on_bad_record=skip" in message
    return
  source = sources.make_source(c.data, "train")
  assert list(source) == [{"text": "a b"}, {"text": "e f"}]
  out = capsys.readouterr().out
  assert "skipped 4 bad records" in out and "train.jsonl:3: not valid JSON" in out
  # Each problem on its own, with the field named:
  for line, text in [(4, "not UTF-8"), (5, "no field 'text'"), (6, "field 'text'")]:
    (tmp_path / "one.jsonl").write_bytes(b"\n".join(lines[:1] * (line - 1) + [lines[line - 1]]))
    with pytest.raises(ConfigError, match=f"one.jsonl:{line}: {text}"):
      sources.make_source(_config(source="jsonl", path=str(tmp_path / "one.jsonl")).data, "train")


def test_hf_dataset_read_as_it_is(tmp_path):
  """The reference's columns (input_ids, condition_input_ids) from save_to_disk directories: a Dataset (any split,
  sharded), a DatasetDict (its split, or its only one), a "{split}" path; ids unchanged; length reported."""
  ids = [[5, 6, 1], [7], [8, 9, 10, 11], [12, 1]]
  conditions = [[20, 21], [22, 23, 24], [], [25]]
  _save_hf_dataset(tmp_path / "plain", {"input_ids": ids, "condition_input_ids": conditions})
  c = _config(source="hf_arrow", path=str(tmp_path / "plain"), text_key="input_ids")
  for split in ("train", "validation"):
    source = sources.make_source(c.data, split)
    assert len(source) == 4
    assert [r["text"].tolist() for r in source] == ids and all(r["text"].dtype == np.int32 for r in source)
  assert pickle.loads(pickle.dumps(source))[3]["text"].tolist() == [12, 1]
  c = _config(source="hf_arrow", path=str(tmp_path / "plain"), conditional=True, input_key="condition_input_ids",
              output_key="input_ids")
  records = list(sources.make_source(c.data, "train"))
  assert [(r["input"].tolist(), r["output"].tolist()) for r in records] == list(zip(conditions, ids))
  # One repository per split (the reference's XSum / WMT14), each a DatasetDict holding a single split.
  _save_hf_dataset(tmp_path / "xsum_train_t5", train={"input_ids": ids, "condition_input_ids": conditions})
  _save_hf_dataset(tmp_path / "xsum_validation_t5", train={"input_ids": ids[:2], "condition_input_ids": conditions[:2]})
  c.data.path = str(tmp_path / "xsum_{split}_t5")
  assert len(sources.make_source(c.data, "train")) == 4 and len(sources.make_source(c.data, "validation")) == 2
  _save_hf_dataset(tmp_path / "two", validation={"input_ids": ids, "condition_input_ids": conditions},
                   test={"input_ids": ids[:1], "condition_input_ids": conditions[:1]})
  c.data.path = str(tmp_path / "two")
  assert len(sources.make_source(c.data, "validation")) == 4 and len(sources.make_source(c.data, "test")) == 1
  with pytest.raises(ValueError, match=r"splits \['test', 'validation'\], not 'train'"):
    sources.make_source(c.data, "train")
  with pytest.raises(KeyError, match="text_key"):
    sources.make_source(_config(source="hf_arrow", path=str(tmp_path / "plain")).data, "train")


def test_hf_hub_id_reads_the_downloaded_repository(tmp_path, monkeypatch):
  """A hub id is fetched with snapshot_download (faked here: no network in tests) and read from the local copy, a
  repository of Parquet files as `push_to_hub` writes them."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  datasets = pytest.importorskip("datasets")
  repo = tmp_path / "snapshot"
  (repo / "data").mkdir(parents=True)
  datasets.Dataset.from_dict({"input_ids": [[5, 6], [7, 8, 9]]}).to_parquet(str(repo / "data" / "train-0.parquet"))
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append((repo_id, kw)) or
                      str(repo))
  c = _config(source="hf_arrow", path="embedded-language-flows/owt_{split}", text_key="input_ids")
  source = sources.make_source(c.data, "train")
  assert calls == [("embedded-language-flows/owt_train", {"repo_type": "dataset"})]
  assert [r["text"].tolist() for r in source] == [[5, 6], [7, 8, 9]]


def test_hf_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; set it for this process
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  c = _config(source="hf_arrow", path="embedded-language-flows/xsum_{split}_t5", conditional=True)
  with pytest.raises(ConfigError) as err:
    sources.make_source(c.data, "validation")
  message = str(err.value)
  assert "\n" not in message and "--config.data.path" in message
  assert "'embedded-language-flows/xsum_validation_t5'" in message


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

@pytest.fixture(scope="module")
def reference_train(train_fixture_dir):
  """(config.json, reference.npz arrays) of the reference_elf_train fixture."""
  return fixture_config(train_fixture_dir), np.load(train_fixture_dir / "reference.npz")


@pytest.mark.parametrize("case", ["uncond_pad", "cond_eos"])
def test_rows_equal_the_reference_collate(reference_train, case):
  """Layout.row on the token lists fed to the reference's collate gives its input_ids, attention_mask (= valid)
  and cond_seq_mask exactly, and the project's encoder mask of (valid, cond_mask) its encoder_attention_mask."""
  cfg, ref = reference_train
  recipe = cfg["cases"][case]
  layout = pipeline.Layout(max_length=cfg["dims"]["S"], max_condition_length=recipe["max_input_length"] or 0,
                           pad_id=cfg["pad_id"], eos_id=cfg["eos_id"], pad_with_eos=recipe["pad_token"] == "eos")
  targets = ref[f"{case}/target_lists"]
  conditions = ref[f"{case}/condition_lists"] if recipe["max_input_length"] else [None] * len(targets)
  strip = lambda ids: None if ids is None else ids[ids >= 0]  # -1 = no token
  rows = [layout.row(strip(t), strip(c)) for t, c in zip(targets, conditions)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  np.testing.assert_array_equal(batch["ids"], ref[f"{case}/input_ids"])
  np.testing.assert_array_equal(batch["valid"], ref[f"{case}/attention_mask"].astype(bool))
  np.testing.assert_array_equal(batch["cond_mask"], ref[f"{case}/cond_seq_mask"].astype(bool))
  # The reference's loss mask (its train step): attention_mask ("pad") or all ones ("eos"), times 1 - cond_seq_mask.
  learned = np.ones_like(batch["valid"]) if layout.pad_with_eos else ref[f"{case}/attention_mask"].astype(bool)
  np.testing.assert_array_equal(batch["loss_mask"], learned & ~ref[f"{case}/cond_seq_mask"].astype(bool))
  encoder_mask = make_encoder_mask(batch["valid"], batch["cond_mask"] if conditions[0] is not None else None)
  np.testing.assert_array_equal(np.asarray(encoder_mask), ref[f"{case}/encoder_attention_mask"].astype(bool))


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
      expected = _encode(tok, source[4 * k + row]["text"])  # no EOS appended
      n = len(expected)
      assert b["ids"][row, :n].tolist() == expected and (b["ids"][row, n:] == 0).all()
      assert b["valid"][row].tolist() == [True] * n + [False] * (S - n)


def test_unconditional_eos_mode_and_truncation(language, tok):
  """EOS padding is learned (loss mask) but not valid; a cut row ends where it is cut (no EOS forced)."""
  c = _config(max_length=5)
  c.flow.pad_token = "eos"
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  source = sources.make_source(c.data, "train", language)
  assert b["loss_mask"].all() and not b["cond_mask"].any()
  lengths = []
  for row in range(4):
    expected = _encode(tok, source[row]["text"])[:5]
    lengths.append(len(expected))
    assert b["ids"][row].tolist() == expected + [1] * (5 - len(expected))
    assert b["valid"][row].tolist() == [True] * len(expected) + [False] * (5 - len(expected))
  assert min(lengths) < 5 and max(lengths) == 5 and b["ids"][lengths.index(5), -1] != 1  # both cases are covered


def test_packing_concatenates_documents(language, tok):
  """Packing (not in the reference): documents, each followed by EOS, concatenated and cut into full rows."""
  c = _config(packing=True)
  batches = _take(iter(pipeline.make_dataset(c, tok, "train", language=language)), 2)
  source = sources.make_source(c.data, "train", language)
  stream = [i for r in range(40) for i in _encode(tok, source[r]["text"]) + [1]]
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
  """[condition[:max_condition_length] ; target] cut to S and padded; condition, valid and loss masks."""
  c, rows = _conditional_config(tmp_path, pad_token)
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  pad = 1 if pad_token == "eos" else 0
  for row, record in enumerate(rows):
    cond = _encode(tok, record["input"])[:4]
    tokens = (cond + _encode(tok, record["output"]))[:8]
    n = len(tokens)
    assert b["ids"][row].tolist() == tokens + [pad] * (8 - n)
    assert b["cond_mask"][row].tolist() == [True] * len(cond) + [False] * (8 - len(cond))
    assert b["valid"][row].tolist() == [True] * n + [False] * (8 - n)
    learned = np.ones(8, bool) if pad_token == "eos" else b["valid"][row]
    assert (b["loss_mask"][row] == (learned & ~b["cond_mask"][row])).all()
  assert not b["valid"].all()  # some rows are padded, and their padding is not valid in either mode


def test_synthetic_translation_rows(language):
  """Conditional synthetic data is the translation task: record i is [sentence i of the unconditional source ;
  its translation], tokenized by a word tokenizer that covers both languages, in [condition ; target] rows."""
  translation = synthetic.SyntheticTranslation(language.vocabulary)
  tok = tokenizer_lib.load_tokenizer("synthetic", translation)
  assert len(tok) == 3 + 2 * len(language.vocabulary)
  c = _config(conditional=True, max_length=24, max_condition_length=12)
  c.flow.pad_token = "eos"
  plain = sources.make_source(_config().data, "train", language)
  records = sources.make_source(c.data, "train", language)
  assert [r["input"] for r in records] == [r["text"] for r in plain]
  assert all(r["output"] == translation.translate(r["input"]) for r in records)
  b = next(iter(pipeline.make_dataset(c, tok, "train", language=language)))
  for row, record in enumerate(records[i] for i in range(len(b["ids"]))):
    source, target = _encode(tok, record["input"]), _encode(tok, record["output"])
    assert tok.unk_token_id not in source + target and len(source) == len(target) <= 12
    n = len(source) + len(target)
    assert b["ids"][row].tolist() == source + target + [tok.eos_token_id] * (24 - n)
    assert tok.decode(b["ids"][row][len(source):n]) == record["output"]
    assert b["cond_mask"][row].tolist() == [True] * len(source) + [False] * (24 - len(source))
    assert b["valid"][row].tolist() == [True] * n + [False] * (24 - n)
    assert (b["loss_mask"][row] == ~b["cond_mask"][row]).all()  # EOS padding: every target position is learned


def test_conditional_length_errors(tmp_path, tok):
  c, _ = _conditional_config(tmp_path, "pad")
  c.data.max_condition_length = 8
  with pytest.raises(ValueError, match="max_condition_length"):
    pipeline.make_dataset(c, tok, "train")
  c.data.max_condition_length, c.data.packing = 4, True
  with pytest.raises(ValueError, match="packing"):
    pipeline.make_dataset(c, tok, "train")


@pytest.mark.parametrize("pad_token", ["pad", "eos"])
def test_pretokenized_ids_are_used_as_they_are(tmp_path, tok, pad_token):
  """The reference's pre-tokenized columns through the whole pipeline: no EOS added, none forced at the cut."""
  _save_hf_dataset(tmp_path / "ids", {"input_ids": [[5, 6, 1], [7], [8, 9], [10, 11, 12, 13, 1]],
                                      "condition_input_ids": [[20, 21, 22, 23], [24], [25, 26], [27]]})
  c = _config(source="hf_arrow", path=str(tmp_path / "ids"), max_length=4, text_key="input_ids")
  c.flow.pad_token = pad_token
  p = 1 if pad_token == "eos" else 0
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  assert b["ids"].tolist() == [[5, 6, 1, p], [7, p, p, p], [8, 9, p, p], [10, 11, 12, 13]]
  assert b["valid"].sum(1).tolist() == [3, 1, 2, 4]
  c.data.update(conditional=True, max_length=6, max_condition_length=3, input_key="condition_input_ids",
                output_key="input_ids")
  b = next(iter(pipeline.make_dataset(c, tok, "train")))
  assert b["ids"].tolist() == [[20, 21, 22, 5, 6, 1], [24, 7, p, p, p, p], [25, 26, 8, 9, p, p],
                               [27, 10, 11, 12, 13, 1]]
  assert b["cond_mask"].sum(1).tolist() == [3, 1, 2, 1] and b["valid"].sum(1).tolist() == [6, 2, 4, 6]


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


@pytest.mark.slow
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


def test_a_tokenizer_folder_with_custom_code_never_runs_it(tmp_path):
  """A tokenizer_config.json whose auto_map points at code in the folder: refused with one message, the code never
  imported, even with "y" piped to a prompt (without trust_remote_code=False transformers asks on stdin)."""
  import subprocess
  import sys
  tokenizer_lib.build_word_tokenizer(["a", "b"], save_dir=str(tmp_path))
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
  del config["tokenizer_class"]  # no local class named: transformers would offer to run the folder's code
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  marker = tmp_path / "ran"
  (tmp_path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "from transformers import PreTrainedTokenizerFast as CustomTokenizer\n")
  code = f"from elf_jax.data import tokenizer; tokenizer.load_tokenizer({str(tmp_path)!r})"
  result = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=300)
  assert not marker.exists()
  assert result.returncode == 1 and "needs custom code from its folder" in result.stderr.splitlines()[-1]
