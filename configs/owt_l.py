r"""ELF-L (652M) on OpenWebText: the ELF-B recipe (`elf_jax.recipes.owt`) at depth 32, hidden 1280, 16 heads, 3 epochs
(the reference's train_owt_ELF-L.yml), with the memory settings of its v5p-64 mesh (benchmarks/compile_v5p64.md).

  python -m elf_jax.main --config=configs/owt_l.py --workdir=gs://BUCKET/elf_l
"""
from elf_jax import recipes


def get_config():
  c = recipes.owt("l")
  # Memory (v5p-64, 16 rows x 1036 tokens per chip, benchmarks/compile_v5p64.md): as ELF-M, dots_saveable remat and
  # flash attention ("auto") in float32 need 43.3 GiB per chip, 55% HBM headroom; params, EMA and Muon state take
  # 7.4 GiB, so no FSDP is needed.
  c.model.attention_impl = "auto"
  c.model.remat = "dots_saveable"
  return c
