r"""The offline conditional demo: ELF learns a synthetic translation task, minutes on 2 CPU cores.

  python -m elf_jax.main --config=configs/tiny_cond.py --workdir=runs/tiny_cond
  python -m elf_jax.main --config=configs/tiny_cond.py --workdir=runs/tiny_cond --mode=eval --config.sample.cfg_scale=3

No download is needed. The source is a sentence of the synthetic language of configs/tiny.py (one word per word
class); the target is its translation by a fixed hidden rule (elf_jax/data/synthetic.py `SyntheticTranslation`):
every noun moves in front of its adjectives, then every word becomes a word of a made-up second language. Rows are
[source ; target] (the conditional recipes' layout, EOS padding), the word tokenizer covers both languages, the
condition is dropped for 10% of the examples (classifier-free guidance training), and evaluation samples one
translation per held-out source with guidance s = sample.cfg_scale and reports BLEU against the exact translation.
"""
from elf_jax import recipes


def get_config():
  return recipes.tiny_cond()
