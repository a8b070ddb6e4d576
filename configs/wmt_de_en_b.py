r"""ELF-B on WMT14 German→English translation (conditional: [German ; English]), evaluated with BLEU — the
reference's train_de-en_ELF-B.yml: the XSum recipe at 128 tokens (64 for the condition) with 5000 samples.

  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=gs://BUCKET/elf_wmt
  python -m elf_jax.main --config=configs/wmt_de_en_b.py --workdir=DIR --mode=eval      # sacreBLEU, lowercased

Data: the reference's pre-tokenized WMT14 De-En on the Hugging Face hub, one dataset per split (as configs/xsum_b.py).
"""
from elf_jax import recipes


def get_config():
  return recipes.wmt_de_en()
