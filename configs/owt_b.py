r"""ELF-B (105M) on OpenWebText — the reference recipe (its train_owt_ELF-B.yml; docs/method.md#training-recipe).

  python -m elf_jax.main --config=configs/owt_b.py --workdir=gs://BUCKET/elf_b
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=sample --config.sample.preset=owt_sde64
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=eval --config.eval.num_seeds=3

The data is the reference's pre-tokenized OpenWebText (T5 ids, column `input_ids`, used as they are), fetched from
the Hugging Face hub into its cache on first use; without hub access, copy it to the machine and pass
--config.data.path=DIR (see elf_jax/data/sources.py). The recipe is `elf_jax.recipes.owt`, shared with configs/owt_m.py
and owt_l.py (other sizes); this file adds the memory settings for its v5p-64 mesh (benchmarks/compile_v5p64.md).
"""
from elf_jax import recipes


def get_config():
  c = recipes.owt("b")
  # Memory (v5p-64, 16 rows x 1036 tokens per chip, benchmarks/compile_v5p64.md): float32 as the reference, flash
  # attention ("auto": Pallas on TPU / GPU, XLA on CPU) and no remat fit with 30.5 GiB per chip, 68% HBM headroom.
  c.model.attention_impl = "auto"
  c.model.remat = "none"
  return c
