"""Record sources: the synthetic language, text and JSONL files, the reference's pre-tokenized Hugging Face datasets
read as they are (local or by hub id), TFDS array records; bad records and missing paths are one clear error."""
import json
import pickle
import zlib

import numpy as np
import pytest

from elf_jax.config import ConfigError
from elf_jax.data import sources

from tests.data.conftest import data_config, save_hf_dataset


def test_synthetic_source_is_deterministic_random_access(language):
  c = data_config()
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
  text = sources.make_source(data_config(source="text", path=str(tmp_path / "{split}.txt")).data, "train")
  assert list(text) == [{"text": "first line"}, {"text": "second line"}]
  rows = [{"input": "a b", "output": "c"}, {"input": "d", "output": "e f"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  jsonl = sources.make_source(data_config(source="jsonl", path=str(tmp_path / "pairs.jsonl"), conditional=True).data,
                              "train")
  assert len(jsonl) == 2 and jsonl[1] == {"input": "d", "output": "e f"}
  with pytest.raises(ConfigError, match=r"pairs.jsonl:1: no field 'text'"):
    sources.make_source(data_config(source="jsonl", path=str(tmp_path / "pairs.jsonl")).data, "train")


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_bad_jsonl_records_are_named_by_file_and_line(tmp_path, capsys, on_bad_record):
  """Line numbers count blank lines; malformed JSON, non-UTF-8 bytes, a missing key and a non-text value are each
  named with their line and field; "skip" trains on the rest and says how many were left out."""
  lines = [b'{"text": "a b"}', b"", b'{"text": "c"', b'{"text": "\xff\xfe"}', b'{"other": "d"}', b'{"text": [1.5]}',
           b'{"text": "e f"}']
  (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  c = data_config(source="jsonl", path=str(tmp_path / "train.jsonl"), on_bad_record=on_bad_record)
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
      sources.make_source(data_config(source="jsonl", path=str(tmp_path / "one.jsonl")).data, "train")


def test_hf_dataset_read_as_it_is(tmp_path):
  """The reference's columns (input_ids, condition_input_ids) from save_to_disk directories: a Dataset (any split,
  sharded), a DatasetDict (its split, or its only one), a "{split}" path; ids unchanged; length reported."""
  ids = [[5, 6, 1], [7], [8, 9, 10, 11], [12, 1]]
  conditions = [[20, 21], [22, 23, 24], [], [25]]
  save_hf_dataset(tmp_path / "plain", {"input_ids": ids, "condition_input_ids": conditions})
  c = data_config(source="hf_arrow", path=str(tmp_path / "plain"), text_key="input_ids")
  for split in ("train", "validation"):
    source = sources.make_source(c.data, split)
    assert len(source) == 4
    assert [r["text"].tolist() for r in source] == ids and all(r["text"].dtype == np.int32 for r in source)
  assert pickle.loads(pickle.dumps(source))[3]["text"].tolist() == [12, 1]
  c = data_config(source="hf_arrow", path=str(tmp_path / "plain"), conditional=True, input_key="condition_input_ids",
              output_key="input_ids")
  records = list(sources.make_source(c.data, "train"))
  assert [(r["input"].tolist(), r["output"].tolist()) for r in records] == list(zip(conditions, ids))
  # One repository per split (the reference's XSum / WMT14), each a DatasetDict holding a single split.
  save_hf_dataset(tmp_path / "xsum_train_t5", train={"input_ids": ids, "condition_input_ids": conditions})
  save_hf_dataset(tmp_path / "xsum_validation_t5", train={"input_ids": ids[:2], "condition_input_ids": conditions[:2]})
  c.data.path = str(tmp_path / "xsum_{split}_t5")
  assert len(sources.make_source(c.data, "train")) == 4 and len(sources.make_source(c.data, "validation")) == 2
  save_hf_dataset(tmp_path / "two", validation={"input_ids": ids, "condition_input_ids": conditions},
                   test={"input_ids": ids[:1], "condition_input_ids": conditions[:1]})
  c.data.path = str(tmp_path / "two")
  assert len(sources.make_source(c.data, "validation")) == 4 and len(sources.make_source(c.data, "test")) == 1
  with pytest.raises(ValueError, match=r"splits \['test', 'validation'\], not 'train'"):
    sources.make_source(c.data, "train")
  with pytest.raises(KeyError, match="text_key"):
    sources.make_source(data_config(source="hf_arrow", path=str(tmp_path / "plain")).data, "train")


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
  c = data_config(source="hf_arrow", path="embedded-language-flows/owt_{split}", text_key="input_ids")
  source = sources.make_source(c.data, "train")
  assert calls == [("embedded-language-flows/owt_train", {"repo_type": "dataset"})]
  assert [r["text"].tolist() for r in source] == [[5, 6], [7, 8, 9]]


def test_hf_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; set it for this process
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  c = data_config(source="hf_arrow", path="embedded-language-flows/xsum_{split}_t5", conditional=True)
  with pytest.raises(ConfigError) as err:
    sources.make_source(c.data, "validation")
  message = str(err.value)
  assert "\n" not in message and "--config.data.path" in message
  assert "'embedded-language-flows/xsum_validation_t5'" in message


@pytest.mark.parametrize("kind", ["text", "jsonl", "hf_arrow"])
def test_missing_path_is_a_clear_error(kind, tmp_path):
  missing = str(tmp_path / "nowhere" / "{split}.data")
  with pytest.raises(FileNotFoundError, match=r"config\.data\.path.*nowhere/validation\.data"):
    sources.make_source(data_config(source=kind, path=missing).data, "validation")


def test_tfds_array_record_source(tmp_path):
  """A tiny TFDS dataset built here in ArrayRecord format, read through tfds.data_source."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class ElfTinyPairs(tfds.core.GeneratorBasedBuilder):
    # A one-part module name, as a script's: for a builder inside a package (tests.data) tfds looks for its checksums
    # file beside the module, through the importlib_resources backport, which nothing here installs.
    __module__ = "elf_tiny_pairs"
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
  c = data_config(source="tfds", path="elf_tiny_pairs", conditional=True, input_key="document", output_key="summary")
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
  source = sources.make_source(data_config(source="tfds", path=name, conditional=True).data, "validation")
  assert source[0] == expected
  assert calls == [(name, {"split": "validation", "data_dir": None, "download": False})]
