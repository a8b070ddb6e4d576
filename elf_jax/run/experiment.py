"""The experiment builder: everything a mode needs from a config, built once into a frozen `Experiment` by
`build(config, workdir, ...)`.

What is built, in which order, and which mode builds what: docs/running.md#experiment-builder.
"""
from collections.abc import Sequence
import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from elf_jax import fs, report
from elf_jax.config import ConfigError, validate
from elf_jax.data import sources, synthetic
from elf_jax.data import tokenizer as tokenizers
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.model.latents import LatentEncoder
from elf_jax.objective import flow, optim
from elf_jax.objective import state as state_lib
from elf_jax.objective import step as step_lib
from elf_jax.objective.state import TrainState
from elf_jax.parallel import mesh as mesh_lib
from elf_jax.parallel import sharding
from elf_jax.run import checkpoint
from elf_jax.sampling import sampler
from elf_jax.weights import published
from elf_jax.weights.encoder import build_encoder

LATENT_STATS_FILE = "latent_stats.json"
# Config fields a resumed training run keeps: they shape the saved state or give its numbers their meaning. Training
# length, logging, checkpoint cadence, mesh, sampling and evaluation settings may change between runs of a workdir.
FIXED_ON_RESUME = ("model", "encoder", "optim.optimizer", "data.tokenizer", "data.conditional")


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  """The step arithmetic and optimizer of a training run, computed once.

  global_batch_size: rows per optimizer update (every device, every micro-batch); grad_accum_steps: micro-batches
  per update, run inside the step; micro_batch_size = global_batch_size / grad_accum_steps; num_groups: decoder
  coin groups per micro-batch (`flow.decoder_groups` resolved against the mesh); steps_per_epoch: optimizer updates
  per epoch, len(training split) // global_batch_size; total_steps: optimizer updates of the run.
  abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings; state_shardings: its NamedShardings.
  """
  global_batch_size: int
  grad_accum_steps: int
  micro_batch_size: int
  num_groups: int
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  abstract_state: TrainState
  state_shardings: TrainState


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Static pieces of a run. tokenizer / language are None when abstract (and language for non-synthetic data);
  encoder_params are arrays, or ShapeDtypeStructs when abstract; param_shapes: the network's parameter tree as
  ShapeDtypeStructs (what a checkpoint must hold); training_plan: the plan of training modes, else None."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  tokenizer: Any
  language: Any
  encoder: LatentEncoder
  encoder_params: Any
  model: ELF
  param_shapes: Any
  training_plan: TrainingPlan | None = None

  def sample_config(self, **overrides) -> sampler.SampleConfig:
    """The sampler settings of `config.sample` with this tokenizer's EOS / padding ids."""
    ids = dict(eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id) if self.tokenizer else {}
    return sampler.SampleConfig.from_config(self.config, **{**ids, **overrides})

  def elf_objective(self) -> step_lib.ElfObjective:
    """The ELF objective of a training step (needs the training plan for the number of coin groups)."""
    return step_lib.ElfObjective(self.model, self.encoder, flow.FlowConfig.from_config(self.config),
                              self._plan().num_groups, self.config.data.conditional)

  def load_ema_params(self, workdir: str):
    """EMA parameters of the latest checkpoint in `workdir`, else of `config.init_from`; clear error if neither."""
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    for source in (workdir if ckpt_dir.is_dir() else None, self.config.init_from or None):
      if source:
        return published.load_params_from(source, self.param_shapes)
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir} and no --config.init_from: train first "
                            "(--mode=train) or point --config.init_from at a published ELF checkpoint")

  def create_state(self) -> TrainState:
    """A sharded fresh TrainState (`jax.jit(init, out_shardings=...)`), starting from `config.init_from` if set."""
    plan, config = self._plan(), self.config
    rng = jax.random.PRNGKey(config.seed)
    init = lambda: step_lib.init_state(self.model, plan.optimizer, rng, config.data.max_length)
    state = jax.jit(init, out_shardings=plan.state_shardings)()
    if config.init_from:
      params = self.load_sharded_params(config.init_from)
      report.say(f"initialised params and EMA from {config.init_from}")
      ema = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the step donates params and EMA separately
      state = state.replace(params=params, ema_params=ema, opt_state=jax.jit(
          plan.optimizer.init, out_shardings=plan.state_shardings.opt_state)(params))
    return state

  def load_sharded_params(self, source: str, field: str = "init_from"):
    """The network's parameters from `source` (a workdir's latest EMA, a checkpoint, a published ELF), sharded like
    the trained parameters (for `init_from` and a distillation teacher)."""
    return jax.device_put(published.load_params_from(source, self.param_shapes, field=field),
                          self._plan().state_shardings.params)

  def replicated(self, tree):
    """`tree` (e.g. the encoder's params) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's numpy batch (ids, masks and, with a latent cache, `latents`) → global arrays sharded over the
    batch axes."""
    sh = sharding.batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One update's global batch as `global_batch` makes it: ids (B, S) int32, valid / cond_mask / loss_mask (B, S)
    bool and, with a latent cache, latents (B, S, C) float32; sharded over the batch axes."""
    sh = sharding.batch_sharding(self.mesh)
    rows = (self._plan().global_batch_size, self.config.data.max_length)
    batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32 if k == "ids" else jnp.bool_, sharding=sh)
             for k in step_lib.BATCH_KEYS}
    if self.config.data.latent_cache_dir:
      batch["latents"] = jax.ShapeDtypeStruct(rows + (self.encoder.dim,), jnp.float32, sharding=sh)
    return batch

  def _plan(self) -> TrainingPlan:
    if self.training_plan is None:
      raise ValueError("this Experiment was built without a training plan: build(..., with_training_plan=True)")
    return self.training_plan


def build(config: ml_collections.ConfigDict, workdir: str | None = None, *, with_training_plan: bool = False,
          devices: Sequence[jax.Device] | None = None, abstract: bool = False) -> Experiment:
  """Validates `config` and builds the run's static pieces (module docstring).

  Args:
    config: the full run config (read only).
    workdir: the run directory holding latent_stats.json (None: the config's statistics).
    with_training_plan: also compute the training plan (reads the training split's length unless `abstract`).
    devices: the mesh's devices (default `jax.devices()`; abstract TPU devices for ahead-of-time compilation).
    abstract: load nothing — no tokenizer, data or encoder weights (shapes only); for `--mode=compile`.
  """
  validate(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  micro_batch = config.optim.global_batch_size // config.optim.grad_accum_steps
  # Bad mesh / batch arithmetic fails before anything loads.
  sharding.check_mesh(mesh, config.model.num_heads, micro_batch if with_training_plan else None)
  num_groups = step_lib.resolve_num_groups(config, mesh, micro_batch) if with_training_plan else 0
  tokenizer, language = (None, None) if abstract else load_tokenizer(config)
  encoder, encoder_params = build_encoder(config, abstract=abstract)
  if tokenizer is not None and len(tokenizer) > encoder.vocab_size:
    raise ConfigError(f"the tokenizer {config.data.tokenizer!r} has {len(tokenizer)} tokens but the encoder "
                      f"{config.encoder.name_or_path!r} embeds only {encoder.vocab_size}; use the encoder's own "
                      "tokenizer (--config.data.tokenizer) or an encoder with that vocabulary")
  if not abstract:
    encoder = _with_saved_latent_stats(config, workdir, encoder, training=with_training_plan)
  model = ELF(ModelConfig.from_config(config))
  param_shapes = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.PRNGKey(0), config.data.max_length)))
  exp = Experiment(config, mesh, tokenizer, language, encoder, encoder_params, model, param_shapes)
  if not with_training_plan:
    return exp
  # Compiling needs no data: the schedule's constants (warm-up, horizon) do not change the compiled program.
  examples = config.optim.global_batch_size if abstract else len(sources.make_source(config.data, config.data.split,
                                                                                     language))
  per_epoch = steps_per_epoch(config, examples)
  n_steps = total_steps(config, per_epoch)
  schedule = optim.make_schedule(config.optim, per_epoch, n_steps)
  optimizer = optim.make_optimizer(config.optim, schedule)
  abstract_state, state_shardings = _state_layout(config, mesh, model, optimizer)
  plan = TrainingPlan(config.optim.global_batch_size, config.optim.grad_accum_steps, micro_batch, num_groups,
                      per_epoch, n_steps, schedule, optimizer, abstract_state, state_shardings)
  return dataclasses.replace(exp, training_plan=plan)


def check_resume_config(config: ml_collections.ConfigDict, workdir: str, saved_config_file: str) -> None:
  """Before a training run in a workdir that holds checkpoints overwrites `saved_config_file` (the previous run's
  config JSON in `workdir`): raises ConfigError naming every field of FIXED_ON_RESUME whose value changed."""
  saved_path = fs.path(workdir) / saved_config_file
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  if not (saved_path.exists() and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    return
  flat = lambda tree, prefix="": {k: v for key, value in tree.items() for k, v in (
      flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(prefix + key, value)])}
  before, now = flat(json.loads(saved_path.read_text())), flat(json.loads(config.to_json_best_effort()))
  changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
             if any(k == f or k.startswith(f + ".") for f in FIXED_ON_RESUME) and before.get(k) != now.get(k)]
  if changed:
    raise ConfigError(f"--workdir={workdir!r} holds checkpoints of another configuration: {', '.join(changed)} "
                      f"(saved in {saved_path}); resume with the saved values or pass a new --workdir (training "
                      "length, logging, checkpointing, sampling and evaluation settings may change)")


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Optimizer updates per epoch: `num_examples // optim.global_batch_size` (the reference's rule; the partial last
  batch is dropped). `num_examples`: examples in the training split."""
  per_epoch = num_examples // config.optim.global_batch_size
  if per_epoch < 1:
    raise ConfigError(f"the training split {config.data.split!r} has {num_examples} examples, fewer than one global "
                      f"batch (optim.global_batch_size={config.optim.global_batch_size}); lower "
                      "--config.optim.global_batch_size or use more data.")
  return per_epoch


def total_steps(config: ml_collections.ConfigDict, per_epoch: int) -> int:
  """Optimizer updates of the run: `optim.num_steps` if > 0, else `round(optim.num_epochs * per_epoch)`."""
  if config.optim.num_steps > 0:
    return int(config.optim.num_steps)
  return max(1, int(round(config.optim.num_epochs * per_epoch)))


def load_tokenizer(config: ml_collections.ConfigDict):
  """(tokenizer, synthetic language or None) of `config.data`, checked against the model's vocabulary. The
  "synthetic" tokenizer of conditional data (the translation task) covers the target language's words too."""
  language = sources.make_language(config.data) if config.data.source == "synthetic" else None
  task = synthetic.SyntheticTranslation(language.vocabulary) if language and config.data.conditional else language
  tok = tokenizers.load_tokenizer(config.data.tokenizer, task)
  if len(tok) > config.model.vocab_size:  # checked before the encoder is built (a random one uses this size too)
    raise ConfigError(f"the tokenizer {config.data.tokenizer!r} has {len(tok)} tokens but the model head predicts "
                      f"model.vocab_size={config.model.vocab_size}; set --config.model.vocab_size={len(tok)} (or "
                      "more) or use the tokenizer the model was built for")
  return tok, language


def _state_layout(config, mesh, model: ELF, optimizer) -> tuple[TrainState, TrainState]:
  """(abstract TrainState with shardings, TrainState of NamedShardings), without allocating anything."""
  seq, rng = config.data.max_length, jax.random.PRNGKey(config.seed)
  boxed = jax.eval_shape(lambda: step_lib.init_boxed_state(model, optimizer, rng, seq))
  shardings = state_lib.state_shardings(mesh, boxed, sharding.rules_from_config(config))
  abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    nn.unbox(boxed), shardings)
  return abstract, shardings


def latent_stats_path(workdir: str):
  """DIR/latent_stats.json: the run's measured latent mean / std ({"mean": float, "std": float})."""
  return fs.path(workdir) / LATENT_STATS_FILE


def _with_saved_latent_stats(config, workdir, encoder: LatentEncoder, training: bool) -> LatentEncoder:
  """The encoder with its latent mean / std: the config's, or (encoder.measure_latent_stats) the run's saved
  DIR/latent_stats.json. A missing file is left to training (`train_loop.measure_latent_stats` measures it) and
  to unconditional sampling and scoring (they never encode); for conditional tasks it is an error."""
  if not config.encoder.measure_latent_stats:
    return encoder
  path = latent_stats_path(workdir) if workdir else None
  if path and path.exists():
    stats = json.loads(path.read_text())
    return encoder.with_stats(stats["mean"], stats["std"])
  if training or not config.data.conditional:
    return encoder
  raise ConfigError(f"encoder.measure_latent_stats is set but {path or LATENT_STATS_FILE} does not exist: the "
                    "statistics (which normalise the condition's latents) are measured and saved there when the "
                    "run trains. Pass the training run's --workdir, or set "
                    "--config.encoder.measure_latent_stats=False with encoder.latent_mean / latent_std")
