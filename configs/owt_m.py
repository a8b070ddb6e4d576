r"""ELF-M (342M) on OpenWebText: the ELF-B recipe at depth 24, hidden 1056, 16 heads, 4 epochs
(the reference's train_owt_ELF-M.yml).

  python -m elf_jax.main --config=configs/owt_m.py --workdir=gs://BUCKET/elf_m
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import owt_b  # noqa: E402  (configs are loaded by path; owt_b holds the shared recipe)


def get_config():
  return owt_b.get_config("m")
