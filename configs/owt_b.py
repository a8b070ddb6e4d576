r"""ELF-B (105M) on OpenWebText — the reference recipe (spec §5, §7; sampling §6).

  python -m elf_jax.main --config=configs/owt_b.py --workdir=gs://BUCKET/elf_b \
      --config.data.path=/data/owt_t5_tokenized            # Hugging Face Arrow dataset saved to disk
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=sample --config.sample.preset=owt_sde64
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=eval --config.eval.num_seeds=3
"""
from elf_jax.config import base_config


def get_config(size: str = "b"):
  c = base_config()
  # Network sizes (spec §5): depth, hidden, heads. ELF-B 104.58M, ELF-M 342.54M, ELF-L 652.10M parameters.
  depth, hidden, heads = {"b": (12, 768, 12), "m": (24, 1056, 16), "l": (32, 1280, 16)}[size]
  c.model.depth, c.model.hidden_size, c.model.num_heads = depth, hidden, heads
  c.model.vocab_size = 32100  # T5 tokens incl. sentinels
  # Frozen T5-small encoder (C = 512) with the reference latent normalisation.
  c.encoder.name_or_path = "t5-small"
  c.encoder.dim = 512
  c.encoder.latent_mean, c.encoder.latent_std = 0.0, 0.2
  # Objective (spec §2-4): OpenWebText settings.
  c.flow.denoiser_noise_scale = 2.0
  c.flow.time_schedule, c.flow.P_mean, c.flow.P_std = "logit_normal", -1.5, 0.8
  c.flow.decoder_prob = 0.2
  c.flow.decoder_noise_scale = 5.0
  c.flow.pad_token = "pad"
  # Data: the published T5-tokenized OpenWebText split (Arrow, saved to disk), 1024 tokens per row.
  c.data.source = "hf_arrow"
  c.data.path = ""  # required: set --config.data.path
  c.data.tokenizer = "t5-small"
  c.data.max_length = 1024
  # Optimisation (spec §7): Muon, lr = 1e-3 * 512 / 256 = 2e-3, warm-up 0.5 epoch then constant, 5 epochs.
  c.optim.optimizer = "muon"
  c.optim.base_lr = 1e-3
  c.optim.global_batch_size = 512
  c.optim.warmup_epochs = 0.5
  c.optim.schedule = "constant"
  c.optim.num_epochs = 5.0
  c.optim.steps_per_epoch = 38034  # as counted by the PyTorch reproduction; set -1 to derive from the data
  c.optim.ema_decay = 0.9999
  # Sampling: the headline setting, SDE 32 steps gamma 1.5, w = 3 (owt_sde64 is the other preset).
  c.sample.preset = "owt_sde32"
  c.sample.num_samples = 1000
  c.sample.batch_size = 125
  c.eval.gpt2 = "gpt2-large"
  c.checkpoint.every_steps = 2000
  c.logging.log_every_steps = 100
  c.logging.sample_every_steps = 0
  return c
