"""grain input pipeline: shard per process, shuffle, tokenize, pad / pack, condition masks, batch.

Unpacked records are batched first and a batch's texts tokenized in one call; packed documents one by one.

Batches are dicts of numpy arrays (`ids`, `valid`, `cond_mask`, `loss_mask`, and `latents` from a latent cache) for
this process's share of the global batch. Batch shapes, the padding / packing / sharding rules and the iterator
state: docs/data.md#pipeline.
"""
from collections.abc import Sequence
import dataclasses

import grain
import ml_collections
import numpy as np
import transformers

from elf_jax.config import PAD_TOKENS, check_choice
from elf_jax.data import latent_cache, sources, synthetic


@dataclasses.dataclass(frozen=True)
class Layout:
  """How token sequences become fixed-length rows (see the module docstring).

  Attributes:
    max_length: S, tokens per row.
    max_condition_length: condition tokens kept (conditional tasks).
    pad_id: id of the padding token ("pad" mode).
    eos_id: id of EOS (the padding token in "eos" mode).
    pad_with_eos: config.flow.pad_token == "eos".
    encode_padding: config.flow.encode_padding (with pad_with_eos): every position is valid, the EOS padding too.
  """
  max_length: int
  max_condition_length: int
  pad_id: int
  eos_id: int
  pad_with_eos: bool
  encode_padding: bool

  def encode(self, value: str | np.ndarray, tokenizer: transformers.PreTrainedTokenizerBase) -> np.ndarray:
    """Text -> its token ids without special tokens; pre-tokenized ids -> unchanged. Returns (n,) int32."""
    return self.encode_batch([value], tokenizer)[0]

  def encode_batch(self, values: Sequence[str | np.ndarray],
                   tokenizer: transformers.PreTrainedTokenizerBase) -> list[np.ndarray]:
    """`encode` of each value, the texts in one tokenizer call (a fast tokenizer encodes a list in Rust, ~50x less
    Python than one call per text). Returns [(n_i,) int32]."""
    texts = [v for v in values if isinstance(v, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else ())
    return [np.asarray(next(encoded) if isinstance(v, str) else v, np.int32) for v in values]

  def row(self, target: np.ndarray, condition: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One example: condition[:max_condition_length] ++ target, truncated and padded to S; with its masks, each (S,)."""
    condition = np.zeros(0, np.int32) if condition is None else condition[:self.max_condition_length]
    tokens = np.concatenate([condition, target])[:self.max_length]
    ids = np.full(self.max_length, self.eos_id if self.pad_with_eos else self.pad_id, np.int32)
    ids[:len(tokens)] = tokens
    positions = np.arange(self.max_length)
    valid = positions < (self.max_length if self.encode_padding else len(tokens))
    cond_mask = positions < len(condition)
    learned = np.ones_like(valid) if self.pad_with_eos else valid
    return {"ids": ids, "valid": valid, "cond_mask": cond_mask, "loss_mask": learned & ~cond_mask}


def make_layout(config: ml_collections.ConfigDict, tokenizer: transformers.PreTrainedTokenizerBase) -> Layout:
  """The Layout of config.data / config.flow.pad_token with the tokenizer's pad and EOS ids; checks lengths."""
  d = config.data
  check_choice("flow.pad_token", config.flow.pad_token, PAD_TOKENS)
  if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
    raise ValueError(f"the tokenizer {type(tokenizer).__name__} needs pad and EOS tokens (T5's: pad 0, EOS 1)")
  if d.max_length < 2:
    raise ValueError(f"config.data.max_length must be >= 2, got {d.max_length}")
  if d.conditional and not 0 < d.max_condition_length < d.max_length:
    raise ValueError(f"conditional data needs 0 < config.data.max_condition_length < config.data.max_length (room "
                     f"for the target), got {d.max_condition_length} and {d.max_length}")
  if d.conditional and d.packing:
    raise ValueError("config.data.packing is for unconditional data; set it False for conditional tasks")
  return Layout(d.max_length, d.max_condition_length, tokenizer.pad_token_id, tokenizer.eos_token_id,
                config.flow.pad_token == "eos", config.flow.encode_padding)


def make_dataset(config: ml_collections.ConfigDict, tokenizer: transformers.PreTrainedTokenizerBase, split: str, *,
                 language: synthetic.HiddenMarkovLanguage | None = None, process_index: int = 0,
                 process_count: int = 1, seed: int | None = None, shuffle: bool | None = None,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 batch_size: int | None = None) -> grain.IterDataset:
  """This process's batches of `split` (module docstring); iterate with iter(...).

  Args:
    config: the full config (data, flow.pad_token, optim.global_batch_size, seed).
    tokenizer: from `elf_jax.data.tokenizer.load_tokenizer`.
    split: split name.
    language: the synthetic language (source "synthetic"); default built from config.data.
    process_index, process_count: this process and the number of processes (jax.process_index() / _count()).
    seed: shuffle seed; default config.seed.
    shuffle: default config.data.shuffle.
    num_epochs: passes over the data; None = repeat forever.
    drop_remainder: drop a last incomplete batch (finite runs).
    batch_size: global examples per batch (default optim.global_batch_size, the batch of one optimizer update, which
      the train step splits into its micro-batches); each process yields batch_size / process_count of them.
  """
  d = config.data
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  global_batch = config.optim.global_batch_size if batch_size is None else batch_size
  if global_batch % process_count:
    raise ValueError(f"the global batch {global_batch} (config.optim.global_batch_size) is not divisible by the "
                     f"{process_count} processes")
  batch_size = global_batch // process_count
  layout = make_layout(config, tokenizer)
  cached = bool(d.get("latent_cache_dir", ""))
  source = latent_cache.open_cache(config, split) if cached else sources.make_source(d, split, language)
  if len(source) < process_count:
    raise ValueError(f"split {split!r} has {len(source)} records, fewer than the {process_count} processes")
  ds = grain.MapDataset.source(source)
  if d.shuffle if shuffle is None else shuffle:
    ds = ds.shuffle(seed=config.seed if seed is None else seed)
  ds = ds.repeat(num_epochs)
  if process_count > 1:
    ds = _ProcessRows(ds, process_index, process_count, batch_size)
  if cached:  # cached rows were already tokenized and padded / packed when the cache was written
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset()
  elif d.packing:  # no per-element thread prefetch: grain scans its whole buffer per element, costs more than it saves
    documents = ds.map(_Document(layout, tokenizer)).to_iter_dataset(grain.ReadOptions(num_threads=0))
    rows = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct={"ids": layout.max_length})
    it = rows.map(_PackedRow(layout)).batch(batch_size, drop_remainder=drop_remainder)
  else:  # records are batched first, so that a batch's texts are tokenized in one call
    it = ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=_Rows(layout, tokenizer, d.conditional)).to_iter_dataset()
  if d.num_workers > 0:  # worker processes; outside an absl app call absl.flags.FLAGS.mark_as_parsed() first
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return it


class _ProcessRows(grain.MapDataset):
  """Process p's rows of every global batch: element i is parent element (i // b)·P·b + p·b + i % b. Length:
  whole global batches only, so every process yields as many batches."""

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, batch_size: int):
    super().__init__(parent)
    self._index, self._count, self._batch = process_index, process_count, batch_size

  def __len__(self) -> int:
    return len(self._parent) // (self._count * self._batch) * self._batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    block, row = divmod(index, self._batch)
    return self._parent[(block * self._count + self._index) * self._batch + row]


@dataclasses.dataclass(frozen=True)
class _Rows:
  """A batch of records -> its examples (Layout.row of each), stacked: {name: (B, S)}. Records are {"text"}
  (unconditional) or {"input", "output"} (conditional), each text or pre-tokenized ids (Layout.encode_batch)."""
  layout: Layout
  tokenizer: transformers.PreTrainedTokenizerBase
  conditional: bool

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    encode = lambda key: self.layout.encode_batch([r[key] for r in records], self.tokenizer)
    if self.conditional:
      rows = [self.layout.row(t, c) for t, c in zip(encode("output"), encode("input"))]
    else:
      rows = [self.layout.row(t) for t in encode("text")]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass(frozen=True)
class _Document:
  """Record -> {"ids": its ids followed by EOS unless they already end with one} (packing separates documents)."""
  layout: Layout
  tokenizer: transformers.PreTrainedTokenizerBase

  def __call__(self, record: dict) -> dict[str, np.ndarray]:
    ids = self.layout.encode(record["text"], self.tokenizer)
    if ids.size == 0 or ids[-1] != self.layout.eos_id:
      ids = np.append(ids, np.int32(self.layout.eos_id))
    return {"ids": ids}


@dataclasses.dataclass(frozen=True)
class _PackedRow:
  """A ConcatThenSplit row (segment id 0 = filler of the last row) -> one example."""
  layout: Layout

  def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return self.layout.row(packed["ids"][packed["ids_segment_ids"] > 0])
