r"""ELF-M (342M) on OpenWebText: the ELF-B recipe (`elf_jax.recipes.owt`) at depth 24, hidden 1056, 16 heads, 4 epochs
(the reference's train_owt_ELF-M.yml), with the memory settings of its v5p-64 mesh (benchmarks/compile_v5p64.md).

  python -m elf_jax.main --config=configs/owt_m.py --workdir=gs://BUCKET/elf_m
"""
from elf_jax import recipes


def get_config():
  c = recipes.owt("m")
  # Memory (v5p-64, 16 rows x 1036 tokens per chip, benchmarks/compile_v5p64.md): without remat the activations
  # overflow a chip; keeping each block's matmul outputs (dots_saveable, less recompute than full) with flash
  # attention ("auto") in float32 needs 28.1 GiB per chip, 71% HBM headroom (no FSDP needed).
  c.model.attention_impl = "auto"
  c.model.remat = "dots_saveable"
  return c
