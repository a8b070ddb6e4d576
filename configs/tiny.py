r"""The offline embedded default: a small ELF on a synthetic English-like language, minutes on 2 CPU cores.

  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --mode=sample --config.sample.save_trajectory=True
  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny --mode=eval --config.eval.num_seeds=3

No download is needed: the corpus is the seeded hidden-Markov language of elf_jax/data/synthetic.py reduced to one
word per word class (55 words, sentences of at most 14 words, with the grammar's agreement and selection intact)
with an exact log-likelihood, the tokenizer is its word-level tokenizer, and the frozen encoder is a
T5-architecture encoder with fixed seeded weights (no pretrained T5 can be had offline); its latent mean/std are
measured from the data at start-up. Evaluation prints the exact Gen. PPL and entropy of the samples under the true
language next to the same figures for held-out true sentences. The full 399-word language is one override away:
--config.data.synthetic_words_per_class=0 --config.model.vocab_size=402 (a harder task for ten CPU minutes: most
samples are then still ungrammatical, see README).
"""
from elf_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  # Network: 4 blocks of width 128 (about 0.9M parameters), one time / guidance / mode token each (the reference's
  # four each would make the 16-token rows 75% longer and every step that much slower).
  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.bottleneck_dim = 32
  c.model.num_time_tokens = 1
  c.model.num_guidance_tokens = 1
  c.model.num_mode_tokens = 1
  c.model.vocab_size = 58  # the word tokenizer: 55 words + pad, EOS, unk
  # Frozen encoder: a random 1-layer T5 of width 32 (C = 32), latents normalised by measured statistics.
  c.encoder.name_or_path = "random"
  c.encoder.dim = 32
  c.encoder.random_num_layers = 1
  c.encoder.random_num_heads = 4
  c.encoder.random_d_kv = 16
  c.encoder.random_d_ff = 128
  c.encoder.measure_latent_stats = True
  # Objective.
  c.flow.denoiser_noise_scale = 1.0
  c.flow.time_schedule, c.flow.P_mean, c.flow.P_std = "logit_normal", -0.8, 1.0
  c.flow.decoder_prob = 0.1  # the decoder is learnt fast here (token loss < 0.03 by the end); denoising needs the steps
  c.flow.decoder_noise_scale = 1.0
  # Sentences are short (mean 6 words in 16 positions): pad with EOS and learn it, as the conditional tasks do, so that
  # the model knows what follows a sentence (with "pad", padded positions are never seen and sampling fills them).
  c.flow.pad_token = "eos"
  # Data: the synthetic language with one word per class, 16 tokens per row (every sentence + EOS fits).
  c.data.source = "synthetic"
  c.data.tokenizer = "synthetic"
  c.data.synthetic_words_per_class = 1
  c.data.max_length = 16
  c.data.synthetic_num_sentences = 200_000
  # Optimisation: AdamW for a short run.
  c.optim.optimizer = "adamw"
  c.optim.base_lr = 6e-3  # lr = 6e-3 * 128 / 256 = 3e-3
  c.optim.global_batch_size = 128
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.num_steps = 2600
  c.optim.ema_decay = 0.998  # a ~500-step average: 0.999 lags a 2600-step run (entropy ratio 0.88 instead of 0.91)
  # Sampling + evaluation at the end: the paper's headline OpenWebText setting (the owt_sde32 preset's values).
  c.sample.method = "sde"
  c.sample.steps = 32
  c.sample.gamma = 1.5
  c.sample.guidance_scale = 3.0
  c.sample.num_samples = 500
  c.sample.batch_size = 250
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2
  c.logging.log_every_steps = 50
  return c
