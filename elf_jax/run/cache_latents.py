r"""Builds a latent cache (`elf_jax.data.latent_cache`): one unshuffled pass over a split through the pipeline and
the frozen encoder, written once and read by every epoch of training.

  python -m elf_jax.run.cache_latents --config=configs/tiny.py --out=/data/tiny_latents [--max_rows=100000]
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --config.data.latent_cache_dir=/data/tiny_latents
"""
import jax
import ml_collections

from elf_jax import fs
from elf_jax.data import latent_cache, pipeline
from elf_jax.run import experiment
from elf_jax.weights.encoder import build_encoder


def build_cache(config: ml_collections.ConfigDict, out_dir: str, split: str | None = None, *,
                max_rows: int | None = None, batch_size: int = 256, rows_per_shard: int = 4096,
                dtype: str = "float32") -> dict:
  """Writes the cache of `split` (default config.data.split) to `out_dir`; returns its index."""
  if config.data.conditional:
    raise ValueError("the latent cache is for unconditional data (conditional tasks drop labels per step)")
  split = split or config.data.split
  config = ml_collections.ConfigDict(config.to_dict())  # a copy that reads the raw data
  config.data.latent_cache_dir = ""
  tokenizer, language = experiment.load_tokenizer(config)
  encoder, encoder_params = build_encoder(config)
  encode = jax.jit(lambda ids, valid: encoder.encode_raw(encoder_params, ids, valid))
  ds = pipeline.make_dataset(config, tokenizer, split, language=language, shuffle=False, num_epochs=1,
                             drop_remainder=False, batch_size=batch_size)
  return latent_cache.write_cache(out_dir, iter(ds), encode, encoder.dim, latent_cache.fingerprint(config, split),
                                  rows_per_shard=rows_per_shard, max_rows=max_rows, dtype=dtype)


def _define_flags():
  """CLI flags (defined only when run as a script)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
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
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(_define_flags())
