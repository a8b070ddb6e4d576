r"""ELF-B (105M) on OpenWebText — the reference recipe (its train_owt_ELF-B.yml; spec §5, §7; sampling §6).

  python -m elf_jax.main --config=configs/owt_b.py --workdir=gs://BUCKET/elf_b
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=sample --config.sample.preset=owt_sde64
  python -m elf_jax.main --config=configs/owt_b.py --workdir=DIR --mode=eval --config.eval.num_seeds=3

The data is the reference's pre-tokenized OpenWebText (T5 ids, column `input_ids`, used as they are), fetched from
the Hugging Face hub into its cache on first use; without hub access, copy it to the machine and pass
--config.data.path=DIR (see elf_jax/data/sources.py). configs/owt_m.py and owt_l.py are this recipe at other sizes.
"""
from elf_jax.config import base_config


def get_config(size: str = "b"):
  c = base_config()
  c.seed = 42
  # Network sizes (spec §5): depth, hidden, heads. ELF-B 104.58M, ELF-M 342.54M, ELF-L 652.10M parameters.
  depth, hidden, heads = {"b": (12, 768, 12), "m": (24, 1056, 16), "l": (32, 1280, 16)}[size]
  c.model.depth, c.model.hidden_size, c.model.num_heads = depth, hidden, heads
  c.model.bottleneck_dim = 128
  c.model.num_time_tokens = c.model.num_guidance_tokens = c.model.num_mode_tokens = 4
  c.model.dropout_rate = 0.0
  c.model.vocab_size = 32100  # T5 tokens incl. sentinels
  # Frozen T5-small encoder (C = 512) with the reference latent normalisation.
  c.encoder.name_or_path = "t5-small"
  c.encoder.dim = 512
  c.encoder.latent_mean, c.encoder.latent_std = 0.0, 0.2
  # Objective (spec §2-4): OpenWebText settings.
  c.flow.denoiser_noise_scale = 2.0
  c.flow.time_schedule, c.flow.P_mean, c.flow.P_std = "logit_normal", -1.5, 0.8
  c.flow.t_eps = 0.05
  c.flow.self_cond_prob = 0.5
  c.flow.guidance_min, c.flow.guidance_max = 0.5, 5.0
  c.flow.decoder_prob = 0.2
  c.flow.decoder_noise_scale = 5.0
  c.flow.decoder_m_mean, c.flow.decoder_m_std = 0.8, 0.8
  c.flow.label_drop_prob = 0.0  # unconditional: nothing to drop (the reference's default)
  c.flow.pad_token = "pad"
  # Data: the reference's T5-tokenized OpenWebText (one dataset; no evaluation split), 1024 tokens per row.
  c.data.source = "hf_arrow"
  c.data.path = "embedded-language-flows/openwebtext-t5"
  c.data.text_key = "input_ids"
  c.data.tokenizer = "t5-small"
  c.data.max_length = 1024
  # Optimisation (spec §7): Muon, lr = 1e-3 * 512 / 256 = 2e-3, warm-up 0.5 epoch then constant; 5 / 4 / 3 epochs
  # of len(train) // 512 steps for B / M / L.
  c.optim.optimizer = "muon"
  c.optim.base_lr = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.global_batch_size = 512
  c.optim.warmup_epochs = 0.5
  c.optim.schedule = "constant"
  c.optim.num_epochs = {"b": 5.0, "m": 4.0, "l": 3.0}[size]
  c.optim.ema_decay = 0.9999
  # Sampling: the headline setting, SDE 32 steps gamma 1.5, w = 3 (owt_sde64 is the other preset); 1000 samples.
  c.sample.preset = "owt_sde32"
  c.sample.num_samples = 1000
  c.sample.batch_size = 125
  c.eval.gpt2 = "gpt2-large"
  c.checkpoint.every_steps = 2000
  c.logging.log_every_steps = 100
  c.logging.sample_every_steps = 0
  return c
