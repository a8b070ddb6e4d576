"""Record sources: random-access sequences of examples, for `grain.MapDataset.source`.

Every source returns dict records in one of two shapes, which the pipeline consumes:
  unconditional (config.data.conditional = False): {"text": str | ids}
  conditional   (config.data.conditional = True):  {"input": str | ids, "output": str | ids}
where `ids` is a 1-D int32 numpy array of already tokenized data (used as is) and a str is tokenized later.

Kinds (config.data.source) and what config.data.path means for each:
  synthetic: no path; record i of a split is one sentence of the synthetic language drawn with the seed
    (config.data.synthetic_seed, split, i), so the corpus is random-access and identical across runs and processes;
    every split has config.data.synthetic_num_sentences records, drawn independently.
  tfds: a TFDS dataset name read through ArrayRecord (`tfds.data_source`, never downloads), from
    config.data.data_dir if that field exists and is set, else TFDS's default ($TFDS_DATA_DIR or
    ~/tensorflow_datasets). xsum (document -> summary) and wmt14_translate/de-en (de -> en) map their fields
    themselves; other datasets use config.data.text_key / input_key / output_key.
  hf_arrow: a directory written by Hugging Face `datasets.save_to_disk` (data-*.arrow IPC streams, state.json), or
    a DatasetDict directory (dataset_dict.json) whose sub-directory `split` is read. Unconditional records use the
    column text_key, or `input_ids` (pre-tokenized) when there is no such column; conditional records use
    input_key / output_key. Read with pyarrow (memory-mapped); `datasets` is not needed.
  jsonl: one JSON object per line, {text_key} or {input_key, output_key}.
  text: one example per line (blank lines skipped).
For jsonl and text, a "{split}" in the path is replaced by the split name; both are held in memory (use tfds or
hf_arrow for large corpora).
"""
from collections.abc import Sequence
import glob
import json
import os
import zlib

import ml_collections
import numpy as np
import pyarrow as pa

from elf_jax.data import synthetic

# Conditional field names (input, output) of the TFDS datasets we know.
TFDS_FIELDS = {"xsum": ("document", "summary"), "wmt14_translate/de-en": ("de", "en")}


def make_language(data_config: ml_collections.ConfigDict) -> synthetic.SyntheticLanguage:
  """The synthetic language of config.data (seed synthetic_seed; optional field synthetic_words_per_class, 0 = all)."""
  words_per_class = data_config.get("synthetic_words_per_class", 0) or None
  return synthetic.SyntheticLanguage(data_config.synthetic_seed, words_per_class)


def make_source(data_config: ml_collections.ConfigDict, split: str,
                language: synthetic.HiddenMarkovLanguage | None = None) -> Sequence[dict]:
  """The record source of `split` described by config.data (module docstring).

  Args:
    data_config: config.data.
    split: split name, e.g. config.data.split or config.data.eval_split.
    language: the synthetic language (source "synthetic"); default `make_language(data_config)`.
  """
  kind = data_config.source
  if kind == "synthetic":
    if data_config.conditional:
      raise ValueError("config.data.source = 'synthetic' is unconditional; set config.data.conditional = False")
    return SyntheticSource(language or make_language(data_config), data_config.synthetic_num_sentences,
                           data_config.synthetic_seed, split)
  if kind == "tfds":
    return _tfds_source(data_config, split)
  if kind not in ("hf_arrow", "jsonl", "text"):
    raise ValueError(f"unknown config.data.source {kind!r}; use synthetic | tfds | hf_arrow | jsonl | text")
  path = data_config.path.replace("{split}", split)
  if not data_config.path or not os.path.exists(path):
    raise FileNotFoundError(f"config.data.path = {data_config.path!r} (split {split!r}): {path!r} does not exist; "
                            f"set config.data.path to your {kind} data")
  fields = _fields(data_config)
  if kind == "hf_arrow":
    return ArrowSource(_arrow_files(path, split), fields, fallback={"text": "input_ids"})
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if kind == "text":
    if data_config.conditional:
      raise ValueError("config.data.source = 'text' is unconditional; use jsonl for conditional data")
    return [{"text": line} for line in lines]
  return MappedSource(_JsonLines(lines), fields, path)


class SyntheticSource(Sequence):
  """Record i = {"text": one sentence of `language` drawn with numpy seed (seed, crc32(split), i)}."""

  def __init__(self, language: synthetic.HiddenMarkovLanguage, num_sentences: int, seed: int, split: str):
    self._language, self._num, self._seed = language, num_sentences, seed
    self._split_id = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._num:
      raise IndexError(f"record {index} out of range for {self._num} synthetic sentences")
    rng = np.random.default_rng([self._seed, self._split_id, index])
    return {"text": self._language.sample(1, rng)[0]}


class MappedSource(Sequence):
  """Renames fields of a parent source's records: fields maps our name ("text" / "input" / "output") to theirs."""

  def __init__(self, parent: Sequence, fields: dict[str, str], description: str):
    self._parent, self._fields = parent, fields
    if len(parent) == 0:
      raise ValueError(f"{description} holds no records")
    missing = [theirs for theirs in fields.values() if theirs not in parent[0]]
    if missing:
      raise KeyError(f"{description}: records lack the field(s) {missing} (have {sorted(parent[0])}); set "
                     "config.data.text_key / input_key / output_key")

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._parent):  # some parents (ArrayRecord) raise ValueError, which ends no iteration
      raise IndexError(f"record {index} out of range for {len(self._parent)} records")
    record = self._parent[index]
    return {ours: _value(record[theirs]) for ours, theirs in self._fields.items()}


class ArrowSource(Sequence):
  """Rows of Arrow IPC stream files (Hugging Face save_to_disk), memory-mapped; re-opened after pickling.

  Args:
    files: the .arrow files, in order.
    fields: our field name -> column name.
    fallback: our field name -> column used when its column is absent (e.g. pre-tokenized `input_ids`).
  """

  def __init__(self, files: list[str], fields: dict[str, str], fallback: dict[str, str] | None = None):
    self._files = files
    schema = _read_arrow(files[:1]).schema
    self._fields = {}
    for ours, theirs in fields.items():
      if theirs not in schema.names and (fallback or {}).get(ours) in schema.names:
        theirs = fallback[ours]
      if theirs not in schema.names:
        raise KeyError(f"{files[0]}: no column {theirs!r} (have {schema.names}); set config.data.text_key / "
                       "input_key / output_key")
      self._fields[ours] = theirs
    self._open()

  def _open(self):
    table = _read_arrow(self._files)
    self._columns = {ours: table.column(theirs) for ours, theirs in self._fields.items()}
    self._len = table.num_rows

  def __getstate__(self) -> dict:
    return {"_files": self._files, "_fields": self._fields}

  def __setstate__(self, state: dict):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return {ours: _value(column[index].as_py()) for ours, column in self._columns.items()}


class _JsonLines(Sequence):
  """Lines of a JSONL file, parsed on access."""

  def __init__(self, lines: list[str]):
    self._lines = lines

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> dict:
    return json.loads(self._lines[index])


def _fields(data_config: ml_collections.ConfigDict) -> dict[str, str]:
  if data_config.conditional:
    return {"input": data_config.input_key, "output": data_config.output_key}
  return {"text": data_config.text_key}


def _value(value) -> str | np.ndarray:
  """A record field as str (text) or int32 ids (pre-tokenized)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  ids = np.asarray(value)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"a record field must be text or a 1-D sequence of token ids, got {type(value).__name__} "
                    f"with dtype {ids.dtype} and shape {ids.shape}")
  return ids.astype(np.int32)


def _tfds_source(data_config: ml_collections.ConfigDict, split: str) -> Sequence[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, only when used)
  name = data_config.path
  if not name:
    raise ValueError("config.data.source = 'tfds' needs the dataset name in config.data.path (e.g. 'xsum')")
  data_dir = data_config.get("data_dir", "") or None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not prepared here"
    raise FileNotFoundError(
        f"TFDS dataset {name!r} (config.data.path) split {split!r} is not available in "
        f"{data_dir or 'the TFDS default data dir'} (config.data.data_dir): {e}. Prepare it in ArrayRecord format "
        "(tfds build --file_format=array_record) where this machine can read it.") from e
  fields = _fields(data_config)
  known = TFDS_FIELDS.get(name.split(":")[0])
  if data_config.conditional and known:
    fields = {"input": known[0], "output": known[1]}
  return MappedSource(source, fields, f"TFDS dataset {name!r} split {split!r}")


def _arrow_files(path: str, split: str) -> list[str]:
  """The data files of a save_to_disk directory (or of `split` in a DatasetDict directory), in order."""
  if os.path.exists(os.path.join(path, "dataset_dict.json")):
    path = os.path.join(path, split)
  state_file = os.path.join(path, "state.json")
  if os.path.exists(state_file):
    with open(state_file) as f:
      files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
  else:
    files = sorted(glob.glob(os.path.join(path, "data-*.arrow")))
  if not files or not all(os.path.exists(f) for f in files):
    raise FileNotFoundError(f"{path!r} (config.data.path, split {split!r}) holds no Hugging Face save_to_disk data "
                            "(state.json and data-*.arrow files)")
  return files


def _read_arrow(files: list[str]) -> pa.Table:
  return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in files])
