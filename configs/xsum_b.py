r"""ELF-B on XSum summarisation (conditional: [document ; summary]) — the reference's train_xsum_ELF-B.yml.

  python -m elf_jax.main --config=configs/xsum_b.py --workdir=gs://BUCKET/elf_xsum
  python -m elf_jax.main --config=configs/xsum_b.py --workdir=DIR --mode=eval   # ROUGE-1/2/L

The data is the reference's pre-tokenized XSum (T5 ids: `condition_input_ids` = document, `input_ids` = summary,
used as they are), one Hugging Face hub dataset per split ("{split}" in the path), fetched into the hub cache on
first use; without hub access, copy them and pass --config.data.path=DIR/xsum_{split}_t5.
"""
from elf_jax import recipes


def get_config():
  return recipes.xsum()
