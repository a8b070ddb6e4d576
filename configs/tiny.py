r"""The offline embedded default: a small ELF on a synthetic English-like language, minutes on 2 CPU cores.

  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --mode=sample --config.sample.save_trajectory=True
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --mode=eval --config.eval.num_seeds=3

No download is needed: the corpus is the seeded hidden-Markov language of elf_jax/data/synthetic.py reduced to one word
per word class (55 words, sentences of at most 14 words, with the grammar's agreement and selection intact) with an
exact log-likelihood, in rows of 13 tokens (sentences of up to 12 words and their EOS: 99.85% of them;
--config.data.max_length=16 fits all); the tokenizer is its word-level tokenizer, and the frozen encoder is a
T5-architecture encoder with fixed seeded weights (no pretrained T5 can be had offline); its latent mean/std are
measured from the data at start-up. Two opt-in variants of the objective are on, because they pay at this scale (README:
the ablation): flow.encode_padding (the encoder attends to the EOS padding) and flow.self_cond_draw = fixed_count (an
exact half of each batch self-conditioned); the reference's objective is --config.flow.encode_padding=False
--config.flow.self_cond_draw=bernoulli. The encoder's latents have 64 channels, with the noise scale
flow.denoiser_noise_scale = 1.41 = √(64/32) to match (README: the third table). Evaluation prints the exact Gen. PPL and
entropy of the samples under the true language next to the same figures for held-out true sentences. The full 399-word
language is one override away: --config.data.synthetic_words_per_class=0 --config.model.vocab_size=402 (a harder task
for ten CPU minutes: most samples are then still ungrammatical, see README).
"""
from elf_jax import recipes


def get_config():
  return recipes.tiny()
