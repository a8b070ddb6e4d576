r"""Latent cache for the frozen encoder (unconditional data): encoder outputs computed once, read every epoch.

Written by `python -m elf_jax.run.cache_latents`, read by the pipeline when config.data.latent_cache_dir is set.
Commands, the shard file layout, row order and sizes: docs/data.md#latent-cache.
"""
from collections.abc import Callable
import json

import ml_collections
import ml_dtypes
import numpy as np

from elf_jax import fs

FORMAT_VERSION = 2  # 2: rows built by the reference's collate rules (EOS padding not valid, no EOS added)
INDEX_FILE = "index.json"
FIELDS = ("ids", "valid", "latents")


def fingerprint(config: ml_collections.ConfigDict, split: str) -> dict:
  """What the cached rows depend on; a cache is only read under a config with the same values."""
  d, e = config.data, config.encoder
  return {"split": split, "source": d.source, "path": d.path, "tokenizer": d.tokenizer, "max_length": d.max_length,
          "packing": d.packing, "pad_token": config.flow.pad_token,
          "encode_padding": config.flow.encode_padding, "encoder": e.name_or_path, "latent_dim": e.dim,
          "encoder_random_seed": e.random_seed if e.name_or_path == "random" else None}


def write_cache(out_dir: str, batches, encode: Callable[[np.ndarray, np.ndarray], np.ndarray], latent_dim: int,
                built_from: dict, *, rows_per_shard: int = 4096, max_rows: int | None = None,
                dtype: str = "float32") -> dict:
  """Encodes `batches` (dicts with ids, valid (b,S)) and writes the shards and index of DIR; returns the index.

  encode: (ids (b,S) int32, valid (b,S) bool) → raw encoder outputs E(ids) (b,S,C=latent_dim), not normalised.
  built_from: the `fingerprint` of the config and split the rows come from.
  `dtype` (float32 | bfloat16) is the storage type of the latents; bfloat16 halves the size but is not exact.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
  out = fs.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  shards, pending, total = [], {k: [] for k in FIELDS}, 0

  def flush():
    n = sum(len(x) for x in pending["ids"])
    if n == 0:
      return
    files = {}
    for k in FIELDS:
      files[k] = f"{k}_{len(shards):05d}.npy"
      fs.save_npy(out / files[k], np.concatenate(pending[k]))
      pending[k].clear()
    shards.append({"rows": n, "files": files})

  for batch in batches:
    if max_rows is not None and total >= max_rows:
      break
    take = len(batch["ids"]) if max_rows is None else min(len(batch["ids"]), max_rows - total)
    ids, valid = np.asarray(batch["ids"][:take], np.int32), np.asarray(batch["valid"][:take], bool)
    latents = np.asarray(encode(ids, valid), np.float32)
    if dtype == "bfloat16":
      latents = latents.astype(ml_dtypes.bfloat16)
    for k, v in zip(FIELDS, (ids, valid, latents)):
      pending[k].append(v)
    total += take
    if sum(len(x) for x in pending["ids"]) >= rows_per_shard:
      flush()
  flush()
  if total == 0:
    raise ValueError("write_cache: the data yielded no rows")
  seq_len = int(fs.load_npy(out / shards[0]["files"]["ids"]).shape[1])
  index = {"version": FORMAT_VERSION, "num_rows": total, "seq_len": seq_len, "latent_dim": latent_dim,
           "dtype": dtype, "normalised": False, "config": built_from, "shards": shards}
  (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
  return index


class CachedRows:
  """Random-access rows of a cache directory (a grain MapDataset source): row i → ids, valid, cond_mask,
  loss_mask (S,) and latents (S, C) float32 raw encoder outputs. Shards are memory-mapped, read lazily.
  loss_mask is the pipeline's rule for unconditional rows: valid, or every position when padding is EOS."""

  def __init__(self, cache_dir: str, expect: dict | None = None):
    path = fs.path(cache_dir) / INDEX_FILE
    if not path.exists():
      raise FileNotFoundError(f"no latent cache at {cache_dir!r} ({INDEX_FILE} missing); build it with "
                              f"`python -m elf_jax.run.cache_latents --config=... --out={cache_dir}`")
    self.index = json.loads(path.read_text())
    if self.index.get("version") != FORMAT_VERSION:
      raise ValueError(f"latent cache {cache_dir!r} has format {self.index.get('version')}, this code reads "
                       f"{FORMAT_VERSION}; rebuild it")
    if expect is not None:
      diff = {k: (self.index["config"].get(k), v) for k, v in expect.items() if self.index["config"].get(k) != v}
      if diff:
        raise ValueError(f"latent cache {cache_dir!r} was built for another config (field: (cache, config)) {diff}; "
                         "rebuild it or point data.latent_cache_dir elsewhere")
    self.dir = cache_dir
    self._pad_with_eos = self.index["config"]["pad_token"] == "eos"
    self._starts = np.cumsum([0] + [s["rows"] for s in self.index["shards"]])
    self._arrays = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _shard(self, i: int) -> dict[str, np.ndarray]:
    if i not in self._arrays:
      files = self.index["shards"][i]["files"]
      self._arrays[i] = {k: fs.load_npy(fs.path(self.dir) / files[k]) for k in FIELDS}
    return self._arrays[i]

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    if not 0 <= row < len(self):
      raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
    shard = int(np.searchsorted(self._starts, row, side="right")) - 1
    arrays, r = self._shard(shard), row - self._starts[shard]
    valid = np.array(arrays["valid"][r])
    loss_mask = np.ones_like(valid) if self._pad_with_eos else valid.copy()
    return {"ids": np.array(arrays["ids"][r]), "valid": valid, "cond_mask": np.zeros_like(valid),
            "loss_mask": loss_mask, "latents": np.asarray(arrays["latents"][r], np.float32)}


def open_cache(config: ml_collections.ConfigDict, split: str) -> CachedRows:
  """The rows of `config.data.latent_cache_dir`, checked against the config (same data, layout and encoder)."""
  if config.data.conditional:
    raise ValueError("data.latent_cache_dir is for unconditional data; unset it for conditional tasks")
  return CachedRows(config.data.latent_cache_dir, fingerprint(config, split))
