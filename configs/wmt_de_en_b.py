r"""ELF-B on WMT14 German→English translation (conditional: [German ; English]), evaluated with BLEU.

  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=gs://BUCKET/elf_wmt
  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=DIR --mode=eval      # sacreBLEU, lowercased
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import xsum_b  # noqa: E402


def get_config():
  c = xsum_b.get_config()
  c.data.path = "wmt14_translate/de-en"
  c.data.max_length = 256  # condition + target; sentence pairs are short
  c.data.max_condition_length = 128
  c.data.eval_split = "validation"
  return c
