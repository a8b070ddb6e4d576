"""The full default configuration, the one place defaults live: every recipe (`elf_jax/recipes.py`, called by the
config files in configs/) starts from `base_config()`, and the static dataclasses (`ModelConfig`, `FlowConfig`,
`SampleConfig`, `DistillConfig`) are built from a config by their `from_config(config, **overrides)`.

Groups: `model` (flow transformer, spec §5), `encoder` (frozen T5, §1), `flow` (objective, §2-4), `data`, `optim`
(§7), `sample` (§6), `eval` (§8), `mesh` (device mesh), `checkpoint`, `logging`, `distill` (§11). Every knob a
researcher may want to change lives here, with a comment; `validate` checks values before anything compiles.
"""
import ml_collections

# Logical parameter axis → mesh axis (None = replicated). `embed` (H) is split over fsdp (ZeRO-3 style);
# heads / MLP hidden / vocabulary over tensor. Unlisted logical axes are replicated.
SHARDING_RULES = (
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # the scanned blocks' stacked layer axis: every block on every device
)


def base_config() -> ml_collections.ConfigDict:
  """Reference defaults (ELF-B on OpenWebText shapes); specific configs override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: init, data order, noise
  # Published ELF checkpoint (msgpack file / orbax dir / the authors' PyTorch torch.save file) or one of our
  # workdirs; "" = random init
  c.init_from = ""

  # Flow transformer (spec §5).
  c.model = ml_collections.ConfigDict()
  c.model.hidden_size = 768  # H
  c.model.depth = 12  # number of blocks
  c.model.num_heads = 12
  c.model.bottleneck_dim = 128  # proj1: C -> bottleneck, proj2: bottleneck -> H
  c.model.mlp_ratio = 4.0  # SwiGLU hidden = floor(floor(mlp_ratio * H) * 2 / 3)
  c.model.num_time_tokens = 4
  c.model.num_guidance_tokens = 4  # "self_cond_cfg" tokens carrying the guidance scale w
  c.model.num_mode_tokens = 4  # switched on for decoding (t = 1 token readout)
  c.model.rope_theta = 10000.0
  c.model.dropout_rate = 0.0  # applied in the middle half of the blocks only
  c.model.vocab_size = 32100  # readout head size V (T5 tokens incl. sentinels)
  c.model.compute_dtype = "float32"  # float32 | bfloat16; params, softmax, norms, losses stay float32
  c.model.attention_impl = "xla"  # xla | pallas | auto (see elf_jax/ops/attention.py)
  c.model.remat = "none"  # none | full | dots_saveable (per block)

  # Frozen T5 encoder (spec §1). `name_or_path`: a local Hugging Face directory, a hub id (online), an official
  # ELF encoder `.pkl` (the published t5_small_encoder_jax.pkl format; dims read from its shapes), or "random"
  # for a T5-architecture encoder with fixed seeded weights (offline default; dims below are used then).
  c.encoder = ml_collections.ConfigDict()
  c.encoder.name_or_path = "t5-small"
  c.encoder.dim = 512  # C, the latent width; must equal the encoder's d_model
  c.encoder.compute_dtype = "float32"
  c.encoder.latent_mean = 0.0  # x0 = (E(ids) - latent_mean) / latent_std
  c.encoder.latent_std = 0.2
  c.encoder.measure_latent_stats = False  # if True, measure mean/std from data at start-up (overrides the two above)
  c.encoder.random_seed = 0  # weights of the "random" encoder
  c.encoder.random_num_layers = 2
  c.encoder.random_num_heads = 4
  c.encoder.random_d_kv = 16
  c.encoder.random_d_ff = 256

  # Flow objective (spec §2-4).
  c.flow = ml_collections.ConfigDict()
  c.flow.denoiser_noise_scale = 2.0  # sigma: z_t = t x0 + (1 - t) sigma eps
  c.flow.time_schedule = "logit_normal"  # logit_normal | uniform
  c.flow.P_mean = -1.5
  c.flow.P_std = 0.8
  c.flow.t_eps = 0.05  # v = (x - z) / max(1 - t, t_eps)
  c.flow.self_cond_prob = 0.5
  # bernoulli: one coin per example (the reference) | fixed_count: exactly round(p * group size) per coin group,
  # so the x_sc = 0 pass runs on those rows only (a cheaper, different objective; opt-in)
  c.flow.self_cond_draw = "bernoulli"
  c.flow.guidance_min = 0.5  # w ~ log-uniform: w = a (b / a)^u - 1, a = 1 + min, b = 1 + max
  c.flow.guidance_max = 5.0
  c.flow.decoder_prob = 0.2  # probability that a group of examples is a decoding step
  c.flow.decoder_groups = -1  # number of coin groups per global batch; -1 = one per batch shard (as the reference)
  c.flow.decoder_noise_scale = 5.0
  c.flow.decoder_m_mean = 0.8  # lambda = sigmoid(m), m ~ N(mean, std)
  c.flow.decoder_m_std = 0.8
  c.flow.label_drop_prob = 0.1  # conditional tasks: drop the condition (CFG training)
  c.flow.pad_token = "pad"  # pad: loss on valid tokens only | eos: padding is EOS and is learned

  # Data.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | tfds | hf_arrow | jsonl | text
  # Dataset name (tfds), hub id or local directory (hf_arrow: Hugging Face datasets), or file (jsonl / text); "{split}"
  # is replaced by the split name.
  c.data.path = ""
  c.data.data_dir = ""  # tfds: the TFDS data dir ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.conditional = False  # [condition ; target] sequences (XSum, WMT)
  c.data.input_key = "input"  # conditional fields
  c.data.output_key = "output"
  c.data.text_key = "text"
  c.data.tokenizer = "t5-small"  # Hugging Face tokenizer dir / hub id; "synthetic" = word tokenizer of the language
  c.data.max_length = 1024  # S, total sequence length (condition + target for conditional tasks)
  # Conditional tasks: condition tokens are cut to this (the reference's max_input_length).
  c.data.max_condition_length = 0
  c.data.packing = False  # pack documents into max_length rows (unconditional) instead of pad/truncate
  c.data.shuffle = True
  c.data.num_workers = 0  # grain worker processes
  # Unconditional data: a directory written by `python -m elf_jax.cache_latents` holding the rows and their
  # raw (unnormalised) frozen-encoder outputs; the pipeline then reads them and the train step skips the encoder.
  c.data.latent_cache_dir = ""
  c.data.synthetic_num_sentences = 200_000  # synthetic language: size of the training corpus
  c.data.synthetic_seed = 1234
  c.data.synthetic_words_per_class = 0  # 0 = the full vocabulary (399 words); a small number gives an easier language

  # Optimisation (spec §7).
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "muon"  # muon | adamw
  c.optim.base_lr = 1e-3  # lr = base_lr * global_batch / 256
  # Muon: optax.contrib.muon's own defaults, as the reference (which passes none): Nesterov momentum on 2-D leaves,
  # and its internal Adam (b1, b2 0.999) on every other leaf. AdamW: the reference's adam_b1 / adam_b2.
  c.optim.muon_momentum = 0.95
  c.optim.muon_adam_b1 = 0.9
  c.optim.muon_adam_b2 = 0.999
  c.optim.adamw_b1 = 0.9
  c.optim.adamw_b2 = 0.95
  c.optim.weight_decay = 0.0  # decoupled, every leaf, either optimizer (the reference: 0)
  c.optim.warmup_steps = -1  # >= 0: warm-up length in optimizer updates; < 0: warmup_epochs is used
  c.optim.warmup_epochs = 0.5
  c.optim.schedule = "constant"  # constant | cosine (after warm-up)
  c.optim.grad_clip = 1.0  # global-norm clip of each micro-batch gradient, before Muon / AdamW (reference); 0 = off
  c.optim.ema_decay = 0.9999
  c.optim.global_batch_size = 512
  # Micro-batches per optimizer step, run inside the one jitted step (lax.scan); divides global_batch_size.
  c.optim.grad_accum_steps = 1
  c.optim.num_epochs = 5.0
  c.optim.num_steps = -1  # if > 0, overrides num_epochs (steps per epoch = len(train split) // global_batch_size)

  # Sampling (spec §6); named presets in elf_jax/sample.py (PRESETS).
  c.sample = ml_collections.ConfigDict()
  # owt_sde32 | owt_sde64 | cond_ode64 | fewstep (a distilled student, spec §11) | "" (fields below)
  c.sample.preset = ""
  c.sample.method = "sde"  # ode | sde
  c.sample.steps = 32
  c.sample.grid = "logit_normal"  # logit_normal (a fresh grid per batch, as every official preset) | uniform
  c.sample.grid_p_mean = -1.5  # logit-normal grid: sorted sigmoid(N(grid_p_mean, grid_p_std)) draws between 0 and 1
  c.sample.grid_p_std = 0.8
  c.sample.gamma = 1.5  # SDE churn
  c.sample.guidance_scale = 3.0  # w (self-conditioning guidance)
  c.sample.cfg_scale = 1.0  # s (classifier-free guidance, conditional tasks)
  c.sample.num_samples = 1000
  c.sample.batch_size = 64
  # --mode=sample: also write DIR/samples/trajectory.{html,jsonl,png} (first 8 samples).
  c.sample.save_trajectory = False

  # Evaluation (spec §8).
  c.eval = ml_collections.ConfigDict()
  c.eval.gpt2 = "gpt2-large"  # Hugging Face GPT-2 dir / hub id for Gen. PPL
  c.eval.num_seeds = 1
  c.eval.samples_path = ""  # --mode=eval on an existing samples JSONL instead of sampling
  c.eval.batch_size = 8
  # --mode=eval: also sweep sampling settings and plot Gen. PPL against entropy (DIR/frontier.png), e.g.
  # "guidance_scale=1,2,3;steps=16,32" (fields of elf_jax.sample.SampleConfig; the grid of all combinations).
  c.eval.sweep = ""

  # Device mesh; -1 = fill with the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.preset = ""  # v5p-64 | v5p-64-fsdp | gpu | gpu-fsdp | cpu-8 (elf_jax/parallel/mesh.py); overrides the sizes
  c.mesh.rules = SHARDING_RULES  # logical axis → mesh axis table (elf_jax/parallel/sharding.py)
  c.mesh.compile_topology = ""  # --mode=compile: e.g. v5p-64
  # Per-chip memory budget (GiB) that --mode=compile and a training run (before its first step) check the compiled
  # step against; 0 = the chip's own HBM (no check on CPU). Set it to plan for a smaller chip (elf_jax/parallel/hbm.py).
  c.mesh.hbm_limit_gib = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.logging = ml_collections.ConfigDict()
  c.logging.log_every_steps = 50
  c.logging.sample_every_steps = 0  # sample + evaluate every N steps during training; 0 = only at the end
  c.logging.tensorboard = True

  # Progressive distillation (--mode=distill, spec §11): rounds of training a few-step student against the frozen
  # teacher. Each round is a training run in DIR/round<i>_<steps>step (optim.* is its recipe, apart from the length
  # and warm-up below); round 1 starts from init_from or else the teacher, round i > 1 from round i − 1's EMA.
  c.distill = ml_collections.ConfigDict()
  # The frozen teacher (its EMA params): a training workdir, a checkpoint dir or a published checkpoint.
  c.distill.teacher = ""
  # Student steps:teacher sub-steps per student step, one round each, in order.
  c.distill.rounds = "16:4,8:8,4:16,2:32,1:64"
  c.distill.steps_per_round = -1  # optimizer updates per round; <= 0: epochs_per_round
  c.distill.epochs_per_round = 1.0
  c.distill.warmup_steps = -1  # per round, as optim.warmup_steps (< 0: warmup_epochs is used)
  c.distill.warmup_epochs = 0.1
  c.distill.student_schedule = "logit_normal"  # t_s = u (1 − 1/steps), u: logit_normal (flow.P_mean, P_std) | uniform
  # The teacher's inner sub-step times within [t_s, t_t]: logit_normal | uniform.
  c.distill.teacher_schedule = "logit_normal"
  return c


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and the fix."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that would otherwise fail late (or silently) — before anything is built or compiled."""
  m, f, d, o, s = config.model, config.flow, config.data, config.optim, config.sample
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  need(o.base_lr > 0, f"optim.base_lr={o.base_lr} must be > 0")
  need(o.global_batch_size > 0, f"optim.global_batch_size={o.global_batch_size} must be > 0")
  need(o.grad_accum_steps >= 1 and o.global_batch_size % o.grad_accum_steps == 0,
       f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1 and divide optim.global_batch_size="
       f"{o.global_batch_size}")
  need(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
  need(o.optimizer in ("muon", "adamw"), f"optim.optimizer={o.optimizer!r}: expected 'muon' or 'adamw'")
  need(o.schedule in ("constant", "cosine"), f"optim.schedule={o.schedule!r}: expected 'constant' or 'cosine'")
  for name in ("decoder_prob", "self_cond_prob", "label_drop_prob"):
    need(0.0 <= f[name] <= 1.0, f"flow.{name}={f[name]} must be in [0, 1]")
  need(f.time_schedule in ("logit_normal", "uniform"),
       f"flow.time_schedule={f.time_schedule!r}: expected 'logit_normal' or 'uniform'")
  need(f.pad_token in ("pad", "eos"), f"flow.pad_token={f.pad_token!r}: expected 'pad' or 'eos'")
  need(f.self_cond_draw in ("bernoulli", "fixed_count"),
       f"flow.self_cond_draw={f.self_cond_draw!r}: expected 'bernoulli' (the reference) or 'fixed_count'")
  need(0.0 < f.t_eps <= 1.0, f"flow.t_eps={f.t_eps} must be in (0, 1]")
  need(0.0 <= f.guidance_min <= f.guidance_max, f"flow.guidance_min/max={f.guidance_min}/{f.guidance_max}: need "
       "0 <= min <= max")
  need(f.denoiser_noise_scale > 0 and f.decoder_noise_scale > 0, "flow.*_noise_scale must be > 0")
  need(m.hidden_size % m.num_heads == 0, f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads="
       f"{m.num_heads}")
  need((m.hidden_size // max(m.num_heads, 1)) % 2 == 0, "model.hidden_size / model.num_heads (the head dim) must be "
       "even for the rotary embedding")
  need(m.compute_dtype in ("float32", "bfloat16"), f"model.compute_dtype={m.compute_dtype!r}: expected float32 or "
       "bfloat16")
  need(m.attention_impl in ("xla", "pallas", "auto"), f"model.attention_impl={m.attention_impl!r}: expected xla, "
       "pallas or auto")
  need(m.remat in ("none", "full", "dots_saveable"), f"model.remat={m.remat!r}: expected none, full or "
       "dots_saveable")
  need(d.max_length > 0, f"data.max_length={d.max_length} must be > 0")
  need(not (d.conditional and d.get("latent_cache_dir")), "data.latent_cache_dir is for unconditional data (label "
       "dropping changes the encoder input of conditional tasks); set --config.data.latent_cache_dir=''")
  if d.conditional:
    need(0 < d.max_condition_length < d.max_length,
         f"data.max_length={d.max_length} must be longer than data.max_condition_length={d.max_condition_length} "
         "(> 0) so that target tokens fit after the condition")
  need(s.method in ("ode", "sde"), f"sample.method={s.method!r}: expected 'ode' or 'sde'")
  need(s.grid in ("uniform", "logit_normal"), f"sample.grid={s.grid!r}: expected 'uniform' or 'logit_normal'")
  need(s.steps >= 1, f"sample.steps={s.steps} must be >= 1")
  need(s.gamma >= 0, f"sample.gamma={s.gamma} must be >= 0")
  for name in ("student_schedule", "teacher_schedule"):
    need(config.distill[name] in ("logit_normal", "uniform"),
         f"distill.{name}={config.distill[name]!r}: expected 'logit_normal' or 'uniform'")
  need(config.mesh.hbm_limit_gib >= 0, f"mesh.hbm_limit_gib={config.mesh.hbm_limit_gib} must be >= 0 (0 = the chip's "
       "own HBM)")
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
