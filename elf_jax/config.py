"""The full default configuration; every config file in configs/ starts from `base_config()`.

Groups: `model` (flow transformer, spec §5), `encoder` (frozen T5, §1), `flow` (objective, §2-4), `data`, `optim`
(§7), `sample` (§6), `eval` (§8), `mesh` (device mesh), `checkpoint`, `logging`. Every knob a researcher may want
to change lives here, with a comment; `validate` checks values before anything compiles.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Reference defaults (ELF-B on OpenWebText shapes); specific configs override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: init, data order, noise
  c.init_from = ""  # published ELF checkpoint (msgpack file / orbax dir) or one of our workdirs; "" = random init

  # Flow transformer (spec §5).
  c.model = m = ml_collections.ConfigDict()
  m.hidden_size = 768  # H
  m.depth = 12  # number of blocks
  m.num_heads = 12
  m.bottleneck_dim = 128  # proj1: C -> bottleneck, proj2: bottleneck -> H
  m.mlp_ratio = 4.0  # SwiGLU hidden = floor(floor(mlp_ratio * H) * 2 / 3)
  m.num_time_tokens = 4
  m.num_guidance_tokens = 4  # "self_cond_cfg" tokens carrying the guidance scale w
  m.num_mode_tokens = 4  # switched on for decoding (t = 1 token readout)
  m.rope_theta = 10000.0
  m.dropout_rate = 0.0  # applied in the middle half of the blocks only
  m.vocab_size = 32100  # readout head size V (T5 tokens incl. sentinels)
  m.compute_dtype = "float32"  # float32 | bfloat16; params, softmax, norms, losses stay float32
  m.attention_impl = "xla"  # xla | pallas | auto (see elf_jax/ops/attention.py)
  m.remat = "none"  # none | full | dots_saveable (per block)

  # Frozen T5 encoder (spec §1). `name_or_path`: a local Hugging Face directory, a hub id (online), or "random"
  # for a T5-architecture encoder with fixed seeded weights (offline default; dims below are used then).
  c.encoder = e = ml_collections.ConfigDict()
  e.name_or_path = "t5-small"
  e.dim = 512  # C, the latent width; must equal the encoder's d_model
  e.compute_dtype = "float32"
  e.latent_mean = 0.0  # x0 = (E(ids) - latent_mean) / latent_std
  e.latent_std = 0.2
  e.measure_latent_stats = False  # if True, measure mean/std from data at start-up (overrides the two above)
  e.random_seed = 0  # weights of the "random" encoder
  e.random_num_layers = 2
  e.random_num_heads = 4
  e.random_d_kv = 16
  e.random_d_ff = 256

  # Flow objective (spec §2-4).
  c.flow = f = ml_collections.ConfigDict()
  f.denoiser_noise_scale = 2.0  # sigma: z_t = t x0 + (1 - t) sigma eps
  f.time_schedule = "logit_normal"  # logit_normal | uniform
  f.P_mean = -1.5
  f.P_std = 0.8
  f.t_eps = 0.05  # v = (x - z) / max(1 - t, t_eps)
  f.self_cond_prob = 0.5
  f.guidance_min = 0.5  # w ~ log-uniform: w = a (b / a)^u - 1, a = 1 + min, b = 1 + max
  f.guidance_max = 5.0
  f.decoder_prob = 0.2  # probability that a group of examples is a decoding step
  f.decoder_groups = -1  # number of coin groups per global batch; -1 = one per batch shard (as the reference)
  f.decoder_noise_scale = 5.0
  f.decoder_m_mean = 0.8  # lambda = sigmoid(m), m ~ N(mean, std)
  f.decoder_m_std = 0.8
  f.label_drop_prob = 0.1  # conditional tasks: drop the condition (CFG training)
  f.pad_token = "pad"  # pad: loss on valid tokens only | eos: padding is EOS and is learned

  # Data.
  c.data = d = ml_collections.ConfigDict()
  d.source = "synthetic"  # synthetic | tfds | hf_arrow | jsonl | text
  d.path = ""  # dataset name (tfds) or path (hf_arrow / jsonl / text)
  d.split = "train"
  d.eval_split = "validation"
  d.conditional = False  # [condition ; target] sequences (XSum, WMT)
  d.input_key = "input"  # conditional fields
  d.output_key = "output"
  d.text_key = "text"
  d.tokenizer = "t5-small"  # Hugging Face tokenizer dir / hub id; "synthetic" = word tokenizer of the language
  d.max_length = 1024  # S, total sequence length (condition + target for conditional tasks)
  d.max_condition_length = 0  # conditional tasks: condition tokens are truncated to this
  d.packing = False  # pack documents into max_length rows (unconditional) instead of pad/truncate
  d.shuffle = True
  d.num_workers = 0  # grain worker processes
  d.synthetic_num_sentences = 200_000  # synthetic language: size of the training corpus
  d.synthetic_seed = 1234

  # Optimisation (spec §7).
  c.optim = o = ml_collections.ConfigDict()
  o.optimizer = "muon"  # muon | adamw
  o.base_lr = 1e-3  # lr = base_lr * global_batch / 256
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.0
  o.warmup_steps = 0  # if 0, warmup_epochs is used
  o.warmup_epochs = 0.5
  o.schedule = "constant"  # constant | cosine (after warm-up)
  o.grad_clip = 1.0  # global-norm clip
  o.ema_decay = 0.9999
  o.global_batch_size = 512
  o.grad_accum_steps = 1
  o.num_epochs = 5.0
  o.num_steps = -1  # if > 0, overrides num_epochs
  o.steps_per_epoch = -1  # if > 0, used when the data source cannot tell its size

  # Sampling (spec §6); presets in configs/sampling.py.
  c.sample = s = ml_collections.ConfigDict()
  s.preset = ""  # owt_sde32 | owt_sde64 | cond_ode64 | "" (fields below)
  s.method = "sde"  # ode | sde
  s.steps = 32
  s.grid = "uniform"  # uniform | logit_normal
  s.gamma = 1.5  # SDE churn
  s.guidance_scale = 3.0  # w (self-conditioning guidance)
  s.cfg_scale = 1.0  # s (classifier-free guidance, conditional tasks)
  s.num_samples = 1000
  s.batch_size = 64
  s.save_trajectory = False

  # Evaluation (spec §8).
  c.eval = v = ml_collections.ConfigDict()
  v.gpt2 = "gpt2-large"  # Hugging Face GPT-2 dir / hub id for Gen. PPL
  v.num_seeds = 1
  v.samples_path = ""  # --mode=eval on an existing samples JSONL instead of sampling
  v.batch_size = 8

  # Device mesh; -1 = fill with the remaining devices.
  c.mesh = h = ml_collections.ConfigDict()
  h.data = -1
  h.fsdp = 1
  h.tensor = 1
  h.compile_topology = ""  # --mode=compile: e.g. v5p-64

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 1000
  k.max_to_keep = 3
  k.async_save = True

  c.logging = g = ml_collections.ConfigDict()
  g.log_every_steps = 50
  g.sample_every_steps = 0  # 0 = only at the end
  g.eval_every_steps = 0
  g.tensorboard = True
  return c
