r"""ELF-L (652M) on OpenWebText: the ELF-B recipe at depth 32, hidden 1280, 16 heads, 3 epochs
(the reference's train_owt_ELF-L.yml).

  python -m elf_jax.main --config=configs/owt_l.py --workdir=gs://BUCKET/elf_l
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import owt_b  # noqa: E402  (configs are loaded by path; owt_b holds the shared recipe)


def get_config():
  return owt_b.get_config("l")
