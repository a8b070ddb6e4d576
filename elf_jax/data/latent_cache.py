r"""Latent cache for the frozen encoder (unconditional data): encoder outputs computed once, read every epoch.

  python -m elf_jax.data.latent_cache --config=configs/tiny.py --out=/data/tiny_latents [--max_rows=100000]
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --config.data.latent_cache_dir=/data/tiny_latents

Layout of DIR, local or gs:// (numpy shards, memory-mapped on read; row by row from gs://):
  index.json               format version, shapes, what the rows were built from (checked against the config)
  ids_00000.npy            (n, S) int32   token ids of the rows, as the pipeline builds them (padding / packing)
  valid_00000.npy          (n, S) bool    encoder / padding mask
  latents_00000.npy        (n, S, C)      RAW encoder outputs E(ids) (float32, or bfloat16 with --dtype), NOT
                                          normalised: the train step applies (E − latent_mean) / latent_std, so the
                                          statistics may change (encoder.measure_latent_stats) without a rebuild.
The rows are one unshuffled pass over the split; the cached pipeline shuffles rows (not documents), so with
packing the row contents equal the on-the-fly rows but the order differs. Size: S·C·4 bytes per row in float32
(2 MiB per 1024-token row for T5-small) — use --max_rows or bfloat16 for large corpora.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from elf_jax import fs
from elf_jax.model.latents import LatentEncoder

FORMAT_VERSION = 2  # 2: rows built by the reference's collate rules (EOS padding not valid, no EOS added)
INDEX_FILE = "index.json"
FIELDS = ("ids", "valid", "latents")


def _fingerprint(config: ml_collections.ConfigDict, split: str) -> dict:
  """What the cached rows depend on; a cache is only read under a config with the same values."""
  d, e = config.data, config.encoder
  return {"split": split, "source": d.source, "path": d.path, "tokenizer": d.tokenizer, "max_length": d.max_length,
          "packing": d.packing, "pad_token": config.flow.pad_token, "encoder": e.name_or_path, "latent_dim": e.dim,
          "encoder_random_seed": e.random_seed if e.name_or_path == "random" else None}


def raw_encode_fn(encoder: LatentEncoder):
  """jit: (encoder params, ids (B,S), valid (B,S)) → raw encoder outputs E(ids) (B,S,C) float32 (no normalisation)."""
  raw = dataclasses.replace(encoder, latent_mean=0.0, latent_std=1.0)
  return jax.jit(lambda params, ids, valid: raw.encode(params, ids, valid))


def write_cache(out_dir: str, batches, encoder: LatentEncoder, encoder_params, fingerprint: dict, *,
                rows_per_shard: int = 4096, max_rows: int | None = None, dtype: str = "float32") -> dict:
  """Encodes `batches` (dicts with ids, valid (b,S)) and writes the shards and index of DIR; returns the index.

  `dtype` (float32 | bfloat16) is the storage type of the latents; bfloat16 halves the size but is not exact.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
  out = fs.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  encode = raw_encode_fn(encoder)
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
    latents = np.asarray(encode(encoder_params, ids, valid).astype(jnp.dtype(dtype)))
    for k, v in zip(FIELDS, (ids, valid, latents)):
      pending[k].append(v)
    total += take
    if sum(len(x) for x in pending["ids"]) >= rows_per_shard:
      flush()
  flush()
  if total == 0:
    raise ValueError("write_cache: the data yielded no rows")
  seq_len = int(fs.load_npy(out / shards[0]["files"]["ids"]).shape[1])
  index = {"version": FORMAT_VERSION, "num_rows": total, "seq_len": seq_len, "latent_dim": encoder.dim,
           "dtype": dtype, "normalised": False, "config": fingerprint, "shards": shards}
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
                              f"`python -m elf_jax.data.latent_cache --config=... --out={cache_dir}`")
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
  return CachedRows(config.data.latent_cache_dir, _fingerprint(config, split))


def build_cache(config: ml_collections.ConfigDict, out_dir: str, split: str | None = None, *,
                max_rows: int | None = None, batch_size: int = 256, rows_per_shard: int = 4096,
                dtype: str = "float32") -> dict:
  """One unshuffled pass over `split` (default config.data.split) through the pipeline and the frozen encoder."""
  from elf_jax.data import pipeline, sources, tokenizer as tokenizers_  # pipeline imports this module
  from elf_jax.model.latents import build_encoder
  if config.data.conditional:
    raise ValueError("the latent cache is for unconditional data (conditional tasks drop labels per step)")
  split = split or config.data.split
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.latent_cache_dir = ""  # read the raw data
  language = sources.make_language(config.data) if config.data.source == "synthetic" else None
  tok = tokenizers_.load_tokenizer(config.data.tokenizer, language)
  encoder, encoder_params = build_encoder(config)
  ds = pipeline.make_dataset(config, tok, split, language=language, shuffle=False, num_epochs=1,
                             drop_remainder=False, batch_size=batch_size)
  return write_cache(out_dir, iter(ds), encoder, encoder_params, _fingerprint(config, split),
                     rows_per_shard=rows_per_shard, max_rows=max_rows, dtype=dtype)


def _define_flags():
  """CLI flags (defined only when run as a script: elf_jax.main defines its own --config)."""
  from absl import flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py (--config.x=... too)")
  out = flags.DEFINE_string("out", None, "output directory (set data.latent_cache_dir to it when training)")
  split = flags.DEFINE_string("split", None, "split to cache (default config.data.split)")
  max_rows = flags.DEFINE_integer("max_rows", None, "stop after this many rows")
  batch_size = flags.DEFINE_integer("batch_size", 256, "rows per encoder call")
  rows_per_shard = flags.DEFINE_integer("rows_per_shard", 4096, "rows per .npy shard")
  dtype = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "storage type of the latents")
  flags.mark_flags_as_required(["config", "out"])

  def main(argv):
    del argv
    index = build_cache(config.value, out.value, split.value, max_rows=max_rows.value, batch_size=batch_size.value,
                        rows_per_shard=rows_per_shard.value, dtype=dtype.value)
    size = sum((fs.path(out.value) / f).stat().length for s in index["shards"] for f in s["files"].values())
    print(f"wrote {index['num_rows']} rows x {index['seq_len']} tokens x C={index['latent_dim']} ({index['dtype']}, "
          f"raw encoder outputs) in {len(index['shards'])} shards, {size / 2**20:.1f} MiB, to {out.value}")
  return main


if __name__ == "__main__":
  from absl import app
  app.run(_define_flags())
