"""Record sources: random-access sequences of examples, for `grain.MapDataset.source`.

`make_source(config, split)` builds the kind named by config.data.source (synthetic, hf_arrow, tfds, jsonl, text);
every source returns {"text"} (unconditional) or {"input", "output"[, "reference"]} records and has a length.
Record shapes, the meaning of config.data.path per kind and bad-record handling: docs/data.md#sources.
"""
from collections.abc import Sequence
import json
import logging
import os
import re
import zlib

import ml_collections
import numpy as np

from elf_jax import fs, report
from elf_jax.config import DATA_SOURCES, ConfigError, check_choice
from elf_jax.data import synthetic

# Conditional field names (input, output) of the TFDS datasets we know.
TFDS_FIELDS = {"xsum": ("document", "summary"), "wmt14_translate/de-en": ("de", "en")}
# A Hugging Face hub repository id ("owner/name"); hf_arrow paths of this form that are no local path name the hub.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
  check_choice("data.source", kind, DATA_SOURCES)
  if kind == "synthetic":
    language = language or make_language(data_config)
    translation = synthetic.SyntheticTranslation(language.vocabulary) if data_config.conditional else None
    return SyntheticSource(language, data_config.synthetic_num_sentences, data_config.synthetic_seed, split,
                           translation)
  if kind == "tfds":
    return _tfds_source(data_config, split)
  path = data_config.path.replace("{split}", split)
  fields = _fields(data_config)
  if kind == "hf_arrow" and HUB_ID.fullmatch(path) and not os.path.exists(path):
    return MappedSource(_hf_dataset(_hub_snapshot(path), split), fields, f"Hugging Face dataset {path!r}",
                        data_config.on_bad_record, _optional_fields(data_config))
  if not data_config.path or not fs.path(path).exists():
    raise FileNotFoundError(f"config.data.path = {data_config.path!r} (split {split!r}): {path!r} does not exist; "
                            f"set config.data.path to your {kind} data")
  if kind == "hf_arrow":
    return MappedSource(_hf_dataset(path, split), fields, f"Hugging Face dataset {path!r}",
                        data_config.on_bad_record, _optional_fields(data_config))
  if kind == "text" and data_config.conditional:
    raise ValueError("config.data.source = 'text' is unconditional; use jsonl for conditional data")
  lines = _scan_lines(path, None if kind == "text" else fields, data_config.on_bad_record)
  if kind == "text":
    return [{"text": line} for _, line in lines]
  return MappedSource(_JsonLines(lines), fields, path, data_config.on_bad_record, _optional_fields(data_config))


def _line_problem(line: str, fields: dict[str, str] | None) -> str:
  """What is wrong with one JSONL record (`fields`: our name -> its key), "" if nothing."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return f"not valid JSON ({e.msg} at column {e.colno})"
  if not isinstance(record, dict):
    return f"a JSON {type(record).__name__}, not an object"
  for theirs in fields.values():
    if theirs not in record:
      return f"no field {theirs!r} (has {sorted(record)[:8]}; set config.data.text_key / input_key / output_key)"
    try:
      _value(record[theirs])
    except (TypeError, ValueError) as e:
      return f"field {theirs!r}: {e}"
  return ""


def _scan_lines(path: str, fields: dict[str, str] | None, on_bad_record: str) -> list[tuple[int, str]]:
  """(line number in the file, text) of every non-blank line of a text (`fields` None) or JSONL file, each checked
  before training: a line that is not UTF-8, not JSON or lacks a field is named as FILE:LINE with its problem and
  stops the run (`data.on_bad_record` = error) or is left out and counted (skip)."""
  good, bad = [], []
  for number, raw in enumerate(fs.path(path).read_bytes().split(b"\n"), start=1):  # local or gs://
    try:
      line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
      bad.append(f"{path}:{number}: not UTF-8 (byte {e.start + 1})")
      continue
    if not line.strip():
      continue
    problem = _line_problem(line, fields) if fields is not None else ""
    if problem:
      bad.append(f"{path}:{number}: {problem}")
    else:
      good.append((number, line))
  if bad and on_bad_record != "skip":
    raise ConfigError(f"{bad[0]}" + (f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else "")
                      + "; fix the data or set --config.data.on_bad_record=skip to train without such records")
  if bad:
    report.say(f"data: skipped {len(bad)} bad records of {path} (data.on_bad_record=skip), the first: {bad[0]}")
  return good


class SyntheticSource(Sequence):
  """Record i = {"text": one sentence of `language` drawn with numpy seed (seed, crc32(split), i)}; with a
  `translation`, {"input": that sentence, "output": translation.translate(sentence)}."""

  def __init__(self, language: synthetic.HiddenMarkovLanguage, num_sentences: int, seed: int, split: str,
               translation: synthetic.SyntheticTranslation | None = None):
    self._language, self._num, self._seed, self._translation = language, num_sentences, seed, translation
    self._split_id = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._num:
      raise IndexError(f"record {index} out of range for {self._num} synthetic sentences")
    rng = np.random.default_rng([self._seed, self._split_id, index])
    sentence = self._language.sample(1, rng)[0]
    if self._translation is None:
      return {"text": sentence}
    return {"input": sentence, "output": self._translation.translate(sentence)}


class MappedSource(Sequence):
  """Renames fields of a parent source's records: fields maps our name ("text" / "input" / "output") to theirs;
  optional fields (our name -> theirs: "reference") are kept when the parent's records have them."""

  def __init__(self, parent: Sequence, fields: dict[str, str], description: str, on_bad_record: str,
               optional: dict[str, str] | None = None):
    self._parent, self._description, self._on_bad_record = parent, description, on_bad_record
    if len(parent) == 0:
      raise ValueError(f"{description} holds no records")
    missing = [theirs for theirs in fields.values() if theirs not in parent[0]]
    if missing:
      raise KeyError(f"{description}: records lack the field(s) {missing} (have {sorted(parent[0])}); set "
                     "config.data.text_key / input_key / output_key")
    self._fields = {**fields, **{ours: theirs for ours, theirs in (optional or {}).items() if theirs in parent[0]}}

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._parent):  # some parents (ArrayRecord) raise ValueError, which ends no iteration
      raise IndexError(f"record {index} out of range for {len(self._parent)} records")
    for offset in range(len(self._parent)):
      at = (int(index) + offset) % len(self._parent)
      try:
        return self._read(at)
      except (KeyError, TypeError, ValueError) as e:
        if self._on_bad_record != "skip":
          raise ConfigError(f"{self._description} record {at}: {e}; fix the data or set "
                            "--config.data.on_bad_record=skip to replace such records by the next good one") from e
        logging.warning("%s record %d: %s; replaced by the next good record (data.on_bad_record=skip)",
                        self._description, at, e)
    raise ConfigError(f"{self._description}: no record is readable")

  def _read(self, index: int) -> dict:
    record = self._parent[index]
    out = {}
    for ours, theirs in self._fields.items():
      if theirs not in record:
        raise KeyError(f"no field {theirs!r}")
      try:
        out[ours] = _value(record[theirs])
      except (TypeError, ValueError) as e:
        raise TypeError(f"field {theirs!r}: {e}") from e
    return out


class _JsonLines(Sequence):
  """(line number, text) lines of a JSONL file, checked by `_scan_lines`, parsed on access."""

  def __init__(self, lines: list[tuple[int, str]]):
    self._lines = lines

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> dict:
    return json.loads(self._lines[index][1])


def _fields(data_config: ml_collections.ConfigDict) -> dict[str, str]:
  if data_config.conditional:
    return {"input": data_config.input_key, "output": data_config.output_key}
  return {"text": data_config.text_key}


def _optional_fields(data_config: ml_collections.ConfigDict) -> dict[str, str]:
  """Conditional records: the raw target text column (data.reference_key) as "reference", where a dataset has it."""
  return {"reference": data_config.reference_key} if data_config.conditional and data_config.reference_key else {}


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
  return MappedSource(source, fields, f"TFDS dataset {name!r} split {split!r}", data_config.on_bad_record)


def _hub_snapshot(repo_id: str) -> str:
  """The local directory of the hub dataset `repo_id` (downloaded once into the hub cache, then read from there)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(repo_id, repo_type="dataset")
  except Exception as e:  # offline, unknown repository, no access: the hub raises several types
    raise ConfigError(
        f"config.data.path={repo_id!r} is no local path and the Hugging Face hub dataset {repo_id!r} could not be "
        f"fetched ({type(e).__name__}); without hub access, copy it to this machine (e.g. `huggingface-cli download "
        f"--repo-type dataset {repo_id} --local-dir DIR`) and set --config.data.path=DIR") from e


def _hf_dataset(path: str, split: str):
  """The `split` of the Hugging Face dataset in the local directory `path`, numpy-formatted (module docstring)."""
  import datasets  # pylint: disable=g-import-not-at-top  (slow import, only when used)
  saved = any((fs.path(path) / f).exists() for f in ("state.json", "dataset_dict.json"))  # datasets reads gs://
  try:
    loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(f"{path!r} (config.data.path, split {split!r}) holds no Hugging Face dataset (a "
                            f"save_to_disk directory or data files): {e}") from e
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded and len(loaded) != 1:
      raise ValueError(f"the Hugging Face dataset {path!r} has the splits {sorted(loaded)}, not {split!r}; set "
                       "config.data.split / eval_split, or put '{split}' in config.data.path")
    loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
  return loaded.with_format("numpy")
