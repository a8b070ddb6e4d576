r"""ELF-B on WMT14 German→English translation (conditional: [German ; English]), evaluated with BLEU — the
reference's train_de-en_ELF-B.yml: the XSum recipe at 128 tokens (64 for the condition) with 5000 samples.

  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=gs://BUCKET/elf_wmt
  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=DIR --mode=eval      # sacreBLEU, lowercased

Data: the reference's pre-tokenized WMT14 De-En on the Hugging Face hub, one dataset per split (as configs/xsum_b.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import xsum_b  # noqa: E402


def get_config():
  c = xsum_b.get_config()
  c.data.path = "embedded-language-flows/wmt14_de-en_{split}_t5"  # wmt14_de-en_train_t5, wmt14_de-en_validation_t5
  c.data.max_length = 128  # condition + target
  c.data.max_condition_length = 64
  c.sample.num_samples = 5000
  return c
