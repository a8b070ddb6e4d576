"""The full default configuration, the one place defaults live: every recipe (`elf_jax/recipes.py`, called by the
config files in configs/) starts from `base_config()`, and the static dataclasses (`ModelConfig`, `FlowConfig`,
`SampleConfig`, `DistillConfig`) are built from a config by their `from_config(config, **overrides)`.

Groups: `model` (flow transformer, spec §5), `encoder` (frozen T5, §1), `flow` (objective, §2-4), `data`, `optim`
(§7), `sample` (§6), `eval` (§8), `mesh` (device mesh), `checkpoint`, `logging`, `distill` (§11). Every knob a
researcher may want to change lives here, with a comment; `validate` checks values before anything compiles.
"""
import importlib.util

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

  # Frozen T5 encoder (spec §1). `name_or_path`: a local Hugging Face directory, a hub id (online), an official
  # ELF encoder `.pkl` (the published t5_small_encoder_jax.pkl format; dims read from its shapes), or "random"
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
  # bernoulli: one coin per example (the reference) | fixed_count: exactly round(p * group size) per coin group,
  # so the x_sc = 0 pass runs on those rows only (a cheaper, different objective; opt-in)
  f.self_cond_draw = "bernoulli"
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
  # Dataset name (tfds), hub id or local directory (hf_arrow: Hugging Face datasets), or file (jsonl / text); "{split}"
  # is replaced by the split name.
  d.path = ""
  d.data_dir = ""  # tfds: the TFDS data dir ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)
  d.split = "train"
  d.eval_split = "validation"
  d.conditional = False  # [condition ; target] sequences (XSum, WMT)
  d.input_key = "input"  # conditional fields
  d.output_key = "output"
  d.text_key = "text"
  # Conditional tasks: the dataset's raw target text column, read as the references of BLEU / ROUGE when the output
  # column is token ids (the official XSum / WMT datasets hold both); a dataset without it has its output ids decoded.
  d.reference_key = "target"
  # Decoding ids to text (samples, conditions, decoded references): Hugging Face's clean-up of spaces before
  # punctuation and English contractions (" ." -> ".", " n't" -> "n't", ...). True is what the official environment
  # did (transformers < 4.45 cleans up unless the tokenizer's config sets otherwise; README, "Evaluation", says how
  # this was established); transformers 5 no longer does by default, so it is always passed explicitly.
  d.clean_up_tokenization_spaces = True
  d.tokenizer = "t5-small"  # Hugging Face tokenizer dir / hub id; "synthetic" = word tokenizer of the language
  d.max_length = 1024  # S, total sequence length (condition + target for conditional tasks)
  d.max_condition_length = 0  # conditional tasks: condition tokens are cut to this (the reference's max_input_length)
  d.packing = False  # pack documents into max_length rows (unconditional) instead of pad/truncate
  d.shuffle = True
  d.num_workers = 0  # grain worker processes
  # Unconditional data: a directory written by `python -m elf_jax.run.cache_latents` holding the rows and their
  # raw (unnormalised) frozen-encoder outputs; the pipeline then reads them and the train step skips the encoder.
  d.latent_cache_dir = ""
  d.synthetic_num_sentences = 200_000  # synthetic language: size of the training corpus
  d.synthetic_seed = 1234
  d.synthetic_words_per_class = 0  # 0 = the full vocabulary (399 words); a small number gives an easier language

  # Optimisation (spec §7).
  c.optim = o = ml_collections.ConfigDict()
  o.optimizer = "muon"  # muon | adamw
  o.base_lr = 1e-3  # lr = base_lr * global_batch / 256
  # Muon: optax.contrib.muon's own defaults, as the reference (which passes none): Nesterov momentum on 2-D leaves,
  # and its internal Adam (b1, b2 0.999) on every other leaf. AdamW: the reference's adam_b1 / adam_b2.
  o.muon_momentum = 0.95
  o.muon_adam_b1 = 0.9
  o.muon_adam_b2 = 0.999
  o.adamw_b1 = 0.9
  o.adamw_b2 = 0.95
  o.weight_decay = 0.0  # decoupled, every leaf, either optimizer (the reference: 0)
  o.warmup_steps = -1  # >= 0: warm-up length in optimizer updates; < 0: warmup_epochs is used
  o.warmup_epochs = 0.5
  o.schedule = "constant"  # constant | cosine (after warm-up)
  o.grad_clip = 1.0  # global-norm clip of each micro-batch gradient, before Muon / AdamW (reference); 0 = off
  o.ema_decay = 0.9999
  o.global_batch_size = 512
  o.grad_accum_steps = 1  # micro-batches per optimizer step, run inside the one jitted step (lax.scan); divides it
  o.num_epochs = 5.0
  o.num_steps = -1  # if > 0, overrides num_epochs (steps per epoch = len(train split) // global_batch_size)

  # Sampling (spec §6); named presets in elf_jax/sampling/sampler.py (PRESETS).
  c.sample = s = ml_collections.ConfigDict()
  s.preset = ""  # owt_sde32 | owt_sde64 | cond_ode64 | fewstep (a distilled student, spec §11) | "" (fields below)
  s.method = "sde"  # ode | sde
  s.steps = 32
  s.grid = "logit_normal"  # logit_normal (a fresh grid per batch, as every official preset) | uniform
  s.grid_p_mean = -1.5  # logit-normal grid: sorted sigmoid(N(grid_p_mean, grid_p_std)) draws between 0 and 1
  s.grid_p_std = 0.8
  s.gamma = 1.5  # SDE churn
  s.guidance_scale = 3.0  # w (self-conditioning guidance)
  s.cfg_scale = 1.0  # s (classifier-free guidance, conditional tasks)
  s.num_samples = 1000
  s.batch_size = 64
  s.save_trajectory = False  # --mode=sample: also write DIR/samples/trajectory.{html,jsonl,png} (first 8 samples)
  # --mode=sample on the user's texts: a file with one input per line (or JSON lines with "text" / "input"); a
  # conditional model answers each, an unconditional one continues each; one output per input, in order. "" = off.
  s.inputs = ""

  # Evaluation (spec §8).
  c.eval = v = ml_collections.ConfigDict()
  v.gpt2 = "gpt2-large"  # Hugging Face GPT-2 dir / hub id for Gen. PPL
  v.num_seeds = 1
  v.samples_path = ""  # --mode=eval on an existing samples JSONL instead of sampling
  v.batch_size = 8
  # --mode=eval: also sweep sampling settings and plot Gen. PPL against entropy (DIR/frontier.png), e.g.
  # "guidance_scale=1,2,3;steps=16,32" (fields of elf_jax.sample.SampleConfig; the grid of all combinations).
  v.sweep = ""
  # MAUVE of unconditional samples against as many held-out texts (length-matched), from the eval.gpt2 model's
  # features; needs the optional package mauve-text (pip install 'elf_jax[mauve]'). Not computed for the synthetic
  # language (no GPT-2) nor for conditional tasks.
  v.mauve = True
  # Conditional tasks: minimum-Bayes-risk decoding over this many samples per condition (1 = off): the candidate with
  # the highest mean mbr_metric against the other candidates is kept and scored as mbr_* beside the first sample.
  v.mbr_candidates = 1
  v.mbr_metric = "bleu"  # bleu (sacreBLEU sentence BLEU, WMT) | rougeL (ROUGE-L F, XSum)

  # Device mesh; -1 = fill with the remaining devices.
  c.mesh = h = ml_collections.ConfigDict()
  h.data = -1
  h.fsdp = 1
  h.tensor = 1
  h.preset = ""  # v5p-64 | v5p-64-fsdp | gpu | gpu-fsdp | cpu-8 (elf_jax/parallel/mesh.py); overrides the sizes
  h.rules = SHARDING_RULES  # logical axis → mesh axis table (elf_jax/parallel/sharding.py)
  h.compile_topology = ""  # --mode=compile: e.g. v5p-64
  # Per-chip memory budget (GiB) that --mode=compile and a training run (before its first step) check the compiled
  # step against; 0 = the chip's own HBM (no check on CPU). Set it to plan for a smaller chip (elf_jax/run/hbm.py).
  h.hbm_limit_gib = 0.0

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 1000
  k.max_to_keep = 3
  k.async_save = True
  # Hugging Face hub repository (org/name) the workdir's checkpoints and results are uploaded to by process 0, after
  # each save and at the end (elf_jax/run/hub_upload.py; needs a token: `hf auth login`); "" = no upload.
  k.hf_repo_id = ""

  c.logging = g = ml_collections.ConfigDict()
  g.log_every_steps = 50
  g.sample_every_steps = 0  # sample + evaluate every N steps during training; 0 = only at the end
  g.tensorboard = True
  g.wandb_project = ""  # Weights & Biases project to log to (process 0; pip install 'elf_jax[wandb]'); "" = off

  # Progressive distillation (--mode=distill, spec §11): rounds of training a few-step student against the frozen
  # teacher. Each round is a training run in DIR/round<i>_<steps>step (optim.* is its recipe, apart from the length
  # and warm-up below); round 1 starts from init_from or else the teacher, round i > 1 from round i − 1's EMA.
  c.distill = x = ml_collections.ConfigDict()
  x.teacher = ""  # the frozen teacher (its EMA params): a training workdir, a checkpoint dir or a published checkpoint
  x.rounds = "16:4,8:8,4:16,2:32,1:64"  # student steps:teacher sub-steps per student step, one round each, in order
  x.steps_per_round = -1  # optimizer updates per round; <= 0: epochs_per_round
  x.epochs_per_round = 1.0
  x.warmup_steps = -1  # per round, as optim.warmup_steps (< 0: warmup_epochs is used)
  x.warmup_epochs = 0.1
  x.student_schedule = "logit_normal"  # t_s = u (1 − 1/steps), u: logit_normal (flow.P_mean, P_std) | uniform
  x.teacher_schedule = "logit_normal"  # the teacher's inner sub-step times within [t_s, t_t]: logit_normal | uniform
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
  v = config.eval
  need(v.mbr_candidates >= 1, f"eval.mbr_candidates={v.mbr_candidates} must be >= 1 (1 = no MBR)")
  need(v.mbr_metric in ("bleu", "rougeL"), f"eval.mbr_metric={v.mbr_metric!r}: expected 'bleu' or 'rougeL'")
  need(not (v.mbr_candidates > 1 and not d.conditional), f"eval.mbr_candidates={v.mbr_candidates} is for conditional "
       "tasks (several samples per condition); set --config.eval.mbr_candidates=1")
  need(not (v.mauve and d.source != "synthetic" and not d.conditional) or importlib.util.find_spec("mauve"),
       "eval.mauve=True needs the optional package mauve-text: pip install 'elf_jax[mauve]' (or set "
       "--config.eval.mauve=False)")
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
