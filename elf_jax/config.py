"""The full default configuration, the one place defaults live: `base_config()`, `validate`, `resolve`, and the
static dataclasses (`ModelConfig`, `FlowConfig`, `SampleConfig`, `DistillConfig`) built by `from_config`.

Groups, presets and how values are resolved: docs/running.md#configuration.
"""
from collections.abc import Mapping
import importlib.util
import itertools
from typing import Any

import ml_collections
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

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

# The allowed values of every enum knob, declared once: `validate` checks the config against them (`CHOICES`) and
# the consumer named beside each dispatches on them.
COMPUTE_DTYPES = ("float32", "bfloat16")  # model.compute_dtype, encoder.compute_dtype
ATTENTION_IMPLS = ("xla", "pallas", "auto")  # model.attention_impl: elf_jax/ops/attention.py
REMAT_POLICIES = ("none", "full", "dots_saveable")  # model.remat: elf_jax/model/elf.py
BLOCK_LOOPS = ("scan", "unrolled")  # model.block_loop: elf_jax/model/elf.py
# flow.time_schedule, distill.student_schedule / teacher_schedule: elf_jax/objective/flow.py sample_time
TIME_SCHEDULES = ("logit_normal", "uniform")
SELF_COND_DRAWS = ("bernoulli", "fixed_count")  # flow.self_cond_draw: elf_jax/objective/flow.py sample_self_cond
PAD_TOKENS = ("pad", "eos")  # flow.pad_token: elf_jax/data/pipeline.py
DATA_SOURCES = ("synthetic", "tfds", "hf_arrow", "jsonl", "text")  # data.source: elf_jax/data/sources.py
OPTIMIZERS = ("muon", "adamw")  # optim.optimizer: elf_jax/objective/optim.py
LR_SCHEDULES = ("constant", "cosine")  # optim.schedule: elf_jax/objective/optim.py
SAMPLE_METHODS = ("ode", "sde")  # sample.method: elf_jax/sampling/sampler.py
SAMPLE_GRIDS = ("logit_normal", "uniform")  # sample.grid: elf_jax/objective/flow.py time_grid
MBR_METRICS = ("bleu", "rougeL")  # eval.mbr_metric: elf_jax/eval/text_metrics.py

# Presets fill the fields they control that the user left unset (None in `base_config`); a field the user sets, on
# the command line or in Python, always wins. `resolve` / `sample_settings` / `mesh_settings` apply them.
# Sampling presets (docs/method.md#sampling), the official sampling configs. Every one draws a fresh logit-normal time
# grid per batch, sigmoid(N(−1.5, 0.8)) (the official code takes P_mean / P_std from the training recipe's denoiser
# time distribution, −1.5 / 0.8 in every official recipe).
SAMPLE_PRESET_FIELDS = ("method", "steps", "grid", "grid_p_mean", "grid_p_std", "gamma", "guidance_scale", "cfg_scale")
_OFFICIAL_GRID = dict(grid="logit_normal", grid_p_mean=-1.5, grid_p_std=0.8)
SAMPLE_PRESETS: dict[str, dict[str, Any]] = {
    # OpenWebText headline: SDE, 32 steps, churn 1.5, self-conditioning guidance 3.
    "owt_sde32": dict(method="sde", steps=32, gamma=1.5, guidance_scale=3.0, cfg_scale=1.0, **_OFFICIAL_GRID),
    # OpenWebText, more steps and less churn.
    "owt_sde64": dict(method="sde", steps=64, gamma=1.0, guidance_scale=3.0, cfg_scale=1.0, **_OFFICIAL_GRID),
    # Conditional tasks (XSum, WMT14 De-En): ODE, 64 steps, classifier-free guidance 2, no self-cond. guidance.
    "cond_ode64": dict(method="ode", steps=64, gamma=0.0, guidance_scale=1.0, cfg_scale=2.0, **_OFFICIAL_GRID),
}
# A progressively distilled student's few-step sampling (docs/method.md#distillation, the authors' few-step eval): the
# settings of `few_step_settings(sample.steps)`; unset sample.steps = the last distillation round's student steps.
FEW_STEP_PRESET = "fewstep"

# Mesh presets: named (data, fsdp, tensor) shapes; -1 = fill with the remaining devices. Each comment states the
# device count the preset is meant for; `elf_jax.parallel.mesh.make_mesh` checks it against the devices it finds.
MESH_AXES = ("data", "fsdp", "tensor")
MESH_PRESETS: dict[str, dict[str, int]] = {
    # Any platform, any device count: pure data parallelism over every device.
    "data-parallel": dict(data=-1, fsdp=1, tensor=1),
    # TPU v5p-64: 32 chips (4 per host, 8 hosts), one ICI slice. ELF-B (105M params) and ELF-M fit every copy of
    # params + EMA + optimizer state on each chip: pure data parallelism, batch 512 = 16 rows per chip.
    "v5p-64": dict(data=32, fsdp=1, tensor=1),
    # TPU v5p-64 with params, EMA and optimizer state sharded over 8 chips (FSDP), 4 data-parallel replicas: optional
    # for every shipped config (ELF-L fits data=32 with 55% headroom); frees room for larger per-chip batches.
    "v5p-64-fsdp": dict(data=4, fsdp=8, tensor=1),
    # GPUs, hosts of 8 (NVLink inside a host): FSDP over a host's 8 GPUs, data parallel across hosts.
    "gpu-fsdp": dict(data=-1, fsdp=8, tensor=1),
    # Tests: 8 host CPU devices (tests/conftest.py), every axis of size 2 so each one is exercised.
    "cpu-8": dict(data=2, fsdp=2, tensor=2),
}


def base_config() -> ml_collections.ConfigDict:
  """The reference's defaults: ELF-B on OpenWebText (`recipes.owt` sets the rest); recipes override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: init, data order, noise
  # Published ELF checkpoint (msgpack file / orbax dir / the authors' PyTorch torch.save file) or one of our
  # workdirs; "" = random init
  c.init_from = ""

  # Flow transformer (docs/method.md#network).
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
  c.model.compute_dtype = "float32"  # COMPUTE_DTYPES; params, softmax, norms, losses stay float32
  c.model.attention_impl = "xla"  # ATTENTION_IMPLS (elf_jax/ops/attention.py)
  c.model.remat = "none"  # REMAT_POLICIES (per block)
  # BLOCK_LOOPS: "scan" compiles one block body (short compiles at any depth, for TPU / GPU pods); "unrolled" runs
  # the same stacked parameters block by block, without the loop's copies (faster CPU steps; docs/model.md#block-loop)
  c.model.block_loop = "scan"

  # Frozen T5 encoder (docs/method.md#latents). `name_or_path`: a local Hugging Face directory, a hub id (online), an
  # official ELF encoder `.pkl` (the published t5_small_encoder_jax.pkl format; dims read from its shapes), or "random"
  # for a T5-architecture encoder with fixed seeded weights (offline default; dims below are used then).
  c.encoder = ml_collections.ConfigDict()
  c.encoder.name_or_path = "t5-small"
  c.encoder.dim = 512  # C, the latent width; must equal the encoder's d_model
  c.encoder.compute_dtype = "float32"  # COMPUTE_DTYPES
  c.encoder.latent_mean = 0.0  # x0 = (E(ids) - latent_mean) / latent_std
  c.encoder.latent_std = 0.2
  c.encoder.measure_latent_stats = False  # if True, measure mean/std from data at start-up (overrides the two above)
  c.encoder.random_seed = 0  # weights of the "random" encoder
  c.encoder.random_num_layers = 2
  c.encoder.random_num_heads = 4
  c.encoder.random_d_kv = 16
  c.encoder.random_d_ff = 256

  # Flow objective (docs/method.md#objective).
  c.flow = ml_collections.ConfigDict()
  c.flow.denoiser_noise_scale = 2.0  # sigma: z_t = t x0 + (1 - t) sigma eps
  c.flow.time_schedule = "logit_normal"  # TIME_SCHEDULES
  c.flow.P_mean = -1.5
  c.flow.P_std = 0.8
  c.flow.t_eps = 0.05  # v = (x - z) / max(1 - t, t_eps)
  c.flow.self_cond_prob = 0.5
  # SELF_COND_DRAWS. bernoulli: one coin per example (the reference); fixed_count: exactly round(p * group size) per
  # coin group, so the x_sc = 0 pass runs on those rows only (a cheaper, different objective; opt-in)
  c.flow.self_cond_draw = "bernoulli"
  c.flow.guidance_min = 0.5  # w ~ log-uniform: w = a (b / a)^u - 1, a = 1 + min, b = 1 + max
  c.flow.guidance_max = 5.0
  c.flow.decoder_prob = 0.2  # probability that a group of examples is a decoding step
  c.flow.decoder_groups = -1  # number of coin groups per global batch; -1 = one per batch shard (as the reference)
  c.flow.decoder_noise_scale = 5.0
  c.flow.decoder_m_mean = 0.8  # lambda = sigmoid(m), m ~ N(mean, std)
  c.flow.decoder_m_std = 0.8
  c.flow.label_drop_prob = 0.1  # conditional tasks: drop the condition (CFG training)
  c.flow.pad_token = "pad"  # PAD_TOKENS. pad: loss on valid tokens only; eos: padding is EOS and is learned
  # pad_token "eos" only, opt-in (configs/tiny.py): the frozen encoder attends to the EOS padding too, and its latents
  # count in measured latent statistics (valid = every position); the reference leaves padding out of the encoder.
  c.flow.encode_padding = False

  # Data.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # DATA_SOURCES
  # Dataset name (tfds), hub id or local directory (hf_arrow: Hugging Face datasets), or file (jsonl / text); "{split}"
  # is replaced by the split name.
  c.data.path = ""
  c.data.data_dir = ""  # tfds: the TFDS data dir ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.conditional = False  # [condition ; target] sequences (XSum, WMT; source "synthetic": the translation task)
  c.data.input_key = "input"  # conditional fields
  c.data.output_key = "output"
  c.data.text_key = "text"
  # Conditional tasks: the dataset's raw target text column, read as the references of BLEU / ROUGE when the output
  # column is token ids (the official XSum / WMT datasets hold both); a dataset without it has its output ids decoded.
  c.data.reference_key = "target"
  # Decoding ids to text (samples, conditions, decoded references): Hugging Face's clean-up of spaces before
  # punctuation and English contractions (" ." -> ".", " n't" -> "n't", ...). True is what the official environment
  # did (transformers < 4.45 cleans up unless the tokenizer's config sets otherwise; README, "Evaluation", says how
  # this was established); transformers 5 no longer does by default, so it is always passed explicitly.
  c.data.clean_up_tokenization_spaces = True
  c.data.tokenizer = "t5-small"  # Hugging Face tokenizer dir / hub id; "synthetic" = word tokenizer of the language
  c.data.max_length = 1024  # S, total sequence length (condition + target for conditional tasks)
  # Conditional tasks: condition tokens are cut to this (the reference's max_input_length).
  c.data.max_condition_length = 0
  c.data.packing = False  # pack documents into max_length rows (unconditional) instead of pad/truncate
  c.data.shuffle = True
  c.data.num_workers = 0  # grain worker processes
  # A malformed record (not UTF-8 / not JSON / a missing field): "error" stops with FILE:LINE and the problem (jsonl
  # and text files are checked before training); "skip" leaves such records out and counts them.
  c.data.on_bad_record = "error"
  # Unconditional data: a directory written by `python -m elf_jax.run.cache_latents` holding the rows and their
  # raw (unnormalised) frozen-encoder outputs; the pipeline then reads them and the train step skips the encoder.
  c.data.latent_cache_dir = ""
  c.data.synthetic_num_sentences = 200_000  # synthetic language: size of the training corpus
  c.data.synthetic_seed = 1234
  c.data.synthetic_words_per_class = 0  # 0 = the full vocabulary (399 words); a small number gives an easier language

  # Optimisation (docs/method.md#training-recipe).
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "muon"  # OPTIMIZERS
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
  c.optim.schedule = "constant"  # LR_SCHEDULES (after warm-up)
  c.optim.grad_clip = 1.0  # global-norm clip of each micro-batch gradient, before Muon / AdamW (reference); 0 = off
  c.optim.ema_decay = 0.9999
  c.optim.global_batch_size = 512
  # Micro-batches per optimizer step, run inside the one jitted step (lax.scan); divides global_batch_size.
  c.optim.grad_accum_steps = 1
  c.optim.num_epochs = 5.0
  c.optim.num_steps = -1  # if > 0, overrides num_epochs (steps per epoch = len(train split) // global_batch_size)
  # A step whose loss or gradient norm is NaN / inf: False stops the run with one line before anything is saved
  # (the newest checkpoint stays the last good one); True leaves params, EMA and optimizer state unchanged for that
  # step (counted as `skipped_nonfinite` in the metrics) and trains on.
  c.optim.skip_nonfinite = False

  # Sampling (docs/method.md#sampling). The fields left unset (None) take the values of `preset` (SAMPLE_PRESETS, or
  # FEW_STEP_PRESET for a distilled student, docs/method.md#distillation); a field set explicitly wins over the preset.
  c.sample = ml_collections.ConfigDict()
  c.sample.preset = "owt_sde32"
  c.sample.method = config_dict.placeholder(str)  # SAMPLE_METHODS
  c.sample.steps = config_dict.placeholder(int)
  c.sample.grid = config_dict.placeholder(str)  # SAMPLE_GRIDS (logit_normal: a fresh grid per batch)
  # Logit-normal grid: sorted sigmoid(N(grid_p_mean, grid_p_std)) draws between 0 and 1.
  c.sample.grid_p_mean = config_dict.placeholder(float)
  c.sample.grid_p_std = config_dict.placeholder(float)
  c.sample.gamma = config_dict.placeholder(float)  # SDE churn
  c.sample.guidance_scale = config_dict.placeholder(float)  # w (self-conditioning guidance)
  c.sample.cfg_scale = config_dict.placeholder(float)  # s (classifier-free guidance, conditional tasks)
  c.sample.num_samples = 1000
  c.sample.batch_size = 64
  # --mode=sample: also write DIR/samples/trajectory.{html,jsonl,png} (first 8 samples).
  c.sample.save_trajectory = False
  # --mode=sample on the user's texts: a file with one input per line (or JSON lines with "text" / "input"); a
  # conditional model answers each, an unconditional one continues each; one output per input, in order. "" = off.
  c.sample.inputs = ""

  # Evaluation (docs/method.md#evaluation).
  c.eval = ml_collections.ConfigDict()
  c.eval.gpt2 = "gpt2-large"  # Hugging Face GPT-2 dir / hub id for Gen. PPL
  c.eval.num_seeds = 1
  c.eval.samples_path = ""  # --mode=eval on an existing samples JSONL instead of sampling
  c.eval.batch_size = 8
  # --mode=eval: also sweep sampling settings and plot Gen. PPL against entropy (DIR/frontier.png), e.g.
  # "guidance_scale=1,2,3;steps=16,32" (SAMPLE_PRESET_FIELDS; every combination, each filled by sample.preset).
  c.eval.sweep = ""
  # MAUVE of unconditional samples against as many held-out texts (length-matched), from the eval.gpt2 model's
  # features; needs the optional package mauve-text (pip install 'elf_jax[mauve]'). Not computed for the synthetic
  # language (no GPT-2) nor for conditional tasks.
  c.eval.mauve = True
  # Conditional tasks: minimum-Bayes-risk decoding over this many samples per condition (1 = off): the candidate with
  # the highest mean mbr_metric against the other candidates is kept and scored as mbr_* beside the first sample.
  c.eval.mbr_candidates = 1
  c.eval.mbr_metric = "bleu"  # MBR_METRICS. bleu: sacreBLEU sentence BLEU (WMT); rougeL: ROUGE-L F (XSum)

  # Device mesh (MESH_AXES): each axis a size or -1 = fill with the remaining devices. The axes left unset (None) take
  # the sizes of `preset` (MESH_PRESETS); an axis set explicitly wins over the preset.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.preset = "data-parallel"
  c.mesh.data = config_dict.placeholder(int)
  c.mesh.fsdp = config_dict.placeholder(int)
  c.mesh.tensor = config_dict.placeholder(int)
  c.mesh.rules = SHARDING_RULES  # logical axis → mesh axis table (elf_jax/parallel/sharding.py)
  c.mesh.compile_topology = ""  # --mode=compile: e.g. v5p-64
  # Per-chip memory budget (GiB) that --mode=compile and a training run (before its first step) check the compiled
  # step against; 0 = the chip's own HBM (no check on CPU). Set it to plan for a smaller chip
  # (elf_jax/run/hbm.py).
  c.mesh.hbm_limit_gib = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  # One run per workdir (DIR/lease.json, renewed at every log and save): a lease not renewed for this long (a run
  # that died on another host) is taken over with a warning; one of a dead process on this host at once.
  c.checkpoint.lease_stale_after_s = 7200.0
  # Hugging Face hub repository (org/name) the workdir's checkpoints and results are uploaded to by process 0, after
  # each save and at the end (elf_jax/run/hub_upload.py; needs a token: `hf auth login`); "" = no upload.
  c.checkpoint.hf_repo_id = ""

  c.logging = ml_collections.ConfigDict()
  c.logging.log_every_steps = 50
  c.logging.sample_every_steps = 0  # sample + evaluate every N steps during training; 0 = only at the end
  c.logging.tensorboard = True
  # Weights & Biases project to log to (process 0; pip install 'elf_jax[wandb]'); "" = off.
  c.logging.wandb_project = ""

  # Progressive distillation (--mode=distill, docs/method.md#distillation): rounds of training a few-step student
  # against the frozen teacher. Each round is a training run in DIR/round<i>_<steps>step (optim.* is its recipe, apart
  # from the length and warm-up below); round 1 starts from init_from or else the teacher, round i > 1 from round
  # i − 1's EMA.
  c.distill = ml_collections.ConfigDict()
  # The frozen teacher (its EMA params): a training workdir, a checkpoint dir or a published checkpoint.
  c.distill.teacher = ""
  # Student steps:teacher sub-steps per student step, one round each, in order (`parse_distill_rounds`).
  c.distill.rounds = "16:4,8:8,4:16,2:32,1:64"
  c.distill.steps_per_round = -1  # optimizer updates per round; <= 0: epochs_per_round
  c.distill.epochs_per_round = 1.0
  c.distill.warmup_steps = -1  # per round, as optim.warmup_steps (< 0: warmup_epochs is used)
  c.distill.warmup_epochs = 0.1
  # TIME_SCHEDULES of t_s = u (1 − 1/steps) (logit_normal: flow.P_mean, P_std) and of the teacher's inner
  # sub-step times within [t_s, t_t].
  c.distill.student_schedule = "logit_normal"
  c.distill.teacher_schedule = "logit_normal"
  return c


class ConfigError(ValueError):
  """A bad configuration value; the message names the field and the fix."""


# Enum knob -> its allowed values, as `validate` checks them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.compute_dtype": COMPUTE_DTYPES, "encoder.compute_dtype": COMPUTE_DTYPES,
    "model.attention_impl": ATTENTION_IMPLS, "model.remat": REMAT_POLICIES, "model.block_loop": BLOCK_LOOPS,
    "flow.time_schedule": TIME_SCHEDULES,
    "flow.self_cond_draw": SELF_COND_DRAWS, "flow.pad_token": PAD_TOKENS, "data.source": DATA_SOURCES,
    "optim.optimizer": OPTIMIZERS, "optim.schedule": LR_SCHEDULES, "distill.student_schedule": TIME_SCHEDULES,
    "distill.teacher_schedule": TIME_SCHEDULES, "eval.mbr_metric": MBR_METRICS,
}


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises ConfigError unless `value` (of config field `field`, e.g. "model.remat") is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"{field}={value!r}: expected one of {', '.join(choices)}")


def few_step_settings(steps: int) -> dict[str, Any]:
  """The FEW_STEP_PRESET's SAMPLE_PRESET_FIELDS for `steps` steps of a distilled student: SDE on the official
  logit-normal grid, churn γ and guidance w by step count (the authors' table: 1-8 steps γ 1.5, w 2.5; 16-32 steps
  γ 2.0, w 2.0)."""
  gamma, w = (1.5, 2.5) if steps <= 8 else (2.0, 2.0)
  return dict(method="sde", steps=steps, gamma=gamma, guidance_scale=w, cfg_scale=1.0, **_OFFICIAL_GRID)


def parse_distill_rounds(spec: str) -> list[tuple[int, int]]:
  """`distill.rounds`, e.g. '16:4,8:8' → [(16, 4), (8, 8)]: (student steps, teacher sub-steps) per round, in order."""
  rounds = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    steps, _, sub = part.partition(":")
    if not (steps.strip().isdigit() and sub.strip().isdigit() and int(steps) >= 1 and int(sub) >= 1):
      raise ConfigError(f"distill.rounds entry {part!r}: expected STUDENT_STEPS:TEACHER_SUB_STEPS, both integers "
                        ">= 1, e.g. '16:4,8:8,4:16,2:32,1:64'")
    rounds.append((int(steps), int(sub)))
  if not rounds:
    raise ConfigError(f"distill.rounds={spec!r} names no round; e.g. '16:4,8:8,4:16,2:32,1:64'")
  return rounds


def parse_sweep(spec: str) -> list[dict[str, Any]]:
  """`eval.sweep`, e.g. 'guidance_scale=1,2;steps=16,32' → every combination as {field: value} over
  SAMPLE_PRESET_FIELDS (values cast to the field's type); [] for an empty spec."""
  types = {name: base_config().sample.get_type(name) for name in SAMPLE_PRESET_FIELDS}
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    name, _, values = part.partition("=")
    name = name.strip()
    if name not in types or not values.strip():
      raise ConfigError(f"eval.sweep entry {part!r}: expected FIELD=v1,v2 with FIELD one of "
                        f"{', '.join(SAMPLE_PRESET_FIELDS)}")
    try:
      axes.append([(name, types[name](v.strip())) for v in values.split(",")])
    except ValueError:
      raise ConfigError(f"eval.sweep entry {part!r}: every value of {name} must be of type {types[name].__name__}")
  return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def sample_settings(config: ml_collections.ConfigDict, **explicit) -> dict[str, Any]:
  """The SAMPLE_PRESET_FIELDS a run samples with: `explicit` values, then the fields set in `config.sample`, then
  `sample.preset` for the rest. Raises ConfigError for an unknown preset."""
  chosen = {name: config.sample[name] for name in SAMPLE_PRESET_FIELDS if config.sample[name] is not None}
  chosen.update({name: value for name, value in explicit.items() if name in SAMPLE_PRESET_FIELDS})
  preset = config.sample.preset
  if preset == FEW_STEP_PRESET:
    steps = chosen["steps"] if "steps" in chosen else parse_distill_rounds(config.distill.rounds)[-1][0]
    return {**few_step_settings(steps), **chosen}
  if preset not in SAMPLE_PRESETS:
    raise ConfigError(f"sample.preset={preset!r} is unknown; choose one of "
                      f"{', '.join([*SAMPLE_PRESETS, FEW_STEP_PRESET])} (sample.* fields you set win over it)")
  return {**SAMPLE_PRESETS[preset], **chosen}


def mesh_settings(mesh_config: Mapping[str, Any]) -> dict[str, int]:
  """The {data, fsdp, tensor} sizes of `config.mesh` (-1 = fill): the axes set explicitly, `mesh.preset`'s for the
  rest. Raises ConfigError for an unknown preset, or an unset axis without one."""
  preset = mesh_config.get("preset")
  if preset is not None and preset not in MESH_PRESETS:
    raise ConfigError(f"mesh.preset={preset!r} is unknown; choose one of {', '.join(MESH_PRESETS)} (mesh.data / "
                      "fsdp / tensor you set win over it)")
  unset = [axis for axis in MESH_AXES if mesh_config.get(axis) is None]
  if unset and preset is None:
    raise ConfigError(f"mesh.{'/'.join(unset)} unset and no mesh.preset to fill them; set them or mesh.preset")
  return {axis: MESH_PRESETS[preset][axis] if axis in unset else mesh_config[axis] for axis in MESH_AXES}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every preset-controlled field holding the value the run uses (what a run prints and
  saves); `config` itself is not modified. Raises ConfigError for an unknown preset."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.sample.update(sample_settings(config))
  resolved.mesh.update(mesh_settings(config.mesh))
  return resolved


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that would otherwise fail late (or silently) — before anything is built or compiled."""
  m, f, d, o = config.model, config.flow, config.data, config.optim
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  def attempt(check, *args, **kwargs):
    """check(...)'s result; None, with its ConfigError recorded, if it raises one."""
    try:
      return check(*args, **kwargs)
    except ConfigError as e:
      problems.append(str(e))
      return None

  for field, choices in CHOICES.items():
    group, key = field.split(".")
    attempt(check_choice, field, config[group][key], choices)
  need(o.base_lr > 0, f"optim.base_lr={o.base_lr} must be > 0")
  need(o.global_batch_size > 0, f"optim.global_batch_size={o.global_batch_size} must be > 0")
  need(o.grad_accum_steps >= 1 and o.global_batch_size % o.grad_accum_steps == 0,
       f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1 and divide optim.global_batch_size="
       f"{o.global_batch_size}")
  need(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
  for name in ("decoder_prob", "self_cond_prob", "label_drop_prob"):
    need(0.0 <= f[name] <= 1.0, f"flow.{name}={f[name]} must be in [0, 1]")
  need(0.0 < f.t_eps <= 1.0, f"flow.t_eps={f.t_eps} must be in (0, 1]")
  need(0.0 <= f.guidance_min <= f.guidance_max, f"flow.guidance_min/max={f.guidance_min}/{f.guidance_max}: need "
       "0 <= min <= max")
  need(f.denoiser_noise_scale > 0 and f.decoder_noise_scale > 0, "flow.*_noise_scale must be > 0")
  need(not f.encode_padding or f.pad_token == "eos", "flow.encode_padding=True needs EOS padding to encode: set "
       "--config.flow.pad_token=eos (or flow.encode_padding=False)")
  need(m.hidden_size % m.num_heads == 0, f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads="
       f"{m.num_heads}")
  need((m.hidden_size // max(m.num_heads, 1)) % 2 == 0, "model.hidden_size / model.num_heads (the head dim) must be "
       "even for the rotary embedding")
  need(d.max_length > 0, f"data.max_length={d.max_length} must be > 0")
  need(d.on_bad_record in ("error", "skip"), f"data.on_bad_record={d.on_bad_record!r}: expected 'error' or 'skip'")
  need(not (d.conditional and d.get("latent_cache_dir")), "data.latent_cache_dir is for unconditional data (label "
       "dropping changes the encoder input of conditional tasks); set --config.data.latent_cache_dir=''")
  if d.conditional:
    need(0 < d.max_condition_length < d.max_length,
         f"data.max_length={d.max_length} must be longer than data.max_condition_length={d.max_condition_length} "
         "(> 0) so that target tokens fit after the condition")
  v = config.eval
  need(v.mbr_candidates >= 1, f"eval.mbr_candidates={v.mbr_candidates} must be >= 1 (1 = no MBR)")
  need(not (v.mbr_candidates > 1 and not d.conditional), f"eval.mbr_candidates={v.mbr_candidates} is for conditional "
       "tasks (several samples per condition); set --config.eval.mbr_candidates=1")
  need(not (v.mauve and d.source != "synthetic" and not d.conditional) or importlib.util.find_spec("mauve"),
       "eval.mauve=True needs the optional package mauve-text: pip install 'elf_jax[mauve]' (or set "
       "--config.eval.mauve=False)")
  attempt(parse_distill_rounds, config.distill.rounds)
  # The sampling settings of the run and of every eval.sweep point (each filled by sample.preset).
  for point in [{}] + (attempt(parse_sweep, config.eval.sweep) or []):
    settings = attempt(sample_settings, config, **point)
    if settings is None:
      break
    field = lambda name: f"sample.{name}={settings[name]!r}" + (f" (eval.sweep point {point})" if point else "")
    need(settings["method"] in SAMPLE_METHODS, f"{field('method')}: expected one of {', '.join(SAMPLE_METHODS)}")
    need(settings["grid"] in SAMPLE_GRIDS, f"{field('grid')}: expected one of {', '.join(SAMPLE_GRIDS)}")
    need(settings["steps"] >= 1, f"{field('steps')} must be >= 1")
    need(settings["gamma"] >= 0, f"{field('gamma')} must be >= 0")
  attempt(mesh_settings, config.mesh)
  need(config.mesh.hbm_limit_gib >= 0, f"mesh.hbm_limit_gib={config.mesh.hbm_limit_gib} must be >= 0 (0 = the chip's "
       "own HBM)")
  if problems:
    # One problem: one line; several: one line each under a heading.
    raise ConfigError("invalid config: " + problems[0] if len(problems) == 1 else
                      "invalid config:\n  - " + "\n  - ".join(problems))


def load_config_file(path, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path`, loaded as `--config=path` loads it, then `overrides`
  ({"group.field": value}, as `--config.group.field=value` sets them; a misspelt key raises KeyError)."""
  config = config_flags.ConfigFileFlagParser(name="config").parse(str(path))
  config.update_from_flattened_dict(dict(overrides or {}))
  return config
