"""Training orchestration: mesh, data, encoder, sharded state, checkpoints, logging, sample/eval hooks.

Everything numerical lives in pure modules (`train/step.py`, `train/loss.py`, `sample.py`); this file wires them to
the outside world. What a person sees: a progress bar with step time and ETA, `DIR/metrics.jsonl`, TensorBoard
events in `DIR/tb`, `DIR/loss_curve.png` at the end, samples in `DIR/samples/`.
"""
import dataclasses
import json
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from elf_jax import checkpoint
from elf_jax import fs
from elf_jax.config import ConfigError, validate
from elf_jax.data import pipeline, sources, tokenizer as tokenizers_
from elf_jax.model.elf import ELF, ModelConfig, init_params
from elf_jax.model.latents import LatentEncoder, build_encoder, measure_latent_stats
from elf_jax.parallel import hbm
from elf_jax.parallel import mesh as mesh_lib
from elf_jax.parallel import sharding
from elf_jax.train import loss as loss_lib
from elf_jax.train import optim
from elf_jax.train import step as step_lib
from elf_jax.train.state import TrainState

LATENT_STATS_FILE = "latent_stats.json"


@dataclasses.dataclass
class Setup:
  """What every mode builds from a config: mesh, tokenizer, language, encoder (with latent stats), model."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  tokenizer: Any
  language: Any
  encoder: LatentEncoder
  encoder_params: Any
  model: ELF


def say(message: str) -> None:
  """Progress output for a person (process 0 only; library logs stay at WARNING unless --verbosity is given)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` (local or gs://) and checks that this process can write there (before anything is
  compiled)."""
  try:
    directory = fs.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except (OSError, ValueError) as e:  # gcsfs raises OSError subclasses and ValueError (bad bucket names)
    raise ConfigError(f"--workdir={workdir!r} is not writable ({type(e).__name__}: {e}); pass a directory you can "
                      "write to") from e


def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> Setup:
  """Validates the config and builds the static pieces; measures (or reloads) latent statistics if asked."""
  validate(config)
  if config.mesh.preset:
    mesh_lib.apply_mesh_preset(config, config.mesh.preset)
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_size = config.optim.global_batch_size // config.optim.grad_accum_steps
  sharding.check_mesh(mesh, config.model.num_heads, batch_size)
  step_lib.resolve_num_groups(config, mesh, batch_size)  # flow.decoder_groups vs the batch shards
  language = sources.make_language(config.data) if config.data.source == "synthetic" else None
  tok = tokenizers_.load_tokenizer(config.data.tokenizer, language)
  if len(tok) > config.model.vocab_size:  # checked before the encoder is built (a random one uses this size too)
    raise ConfigError(f"the tokenizer {config.data.tokenizer!r} has {len(tok)} tokens but the model head predicts "
                      f"model.vocab_size={config.model.vocab_size}; set --config.model.vocab_size={len(tok)} (or "
                      "more) or use the tokenizer the model was built for")
  encoder, encoder_params = build_encoder(config)
  if len(tok) > encoder.vocab_size:
    raise ConfigError(f"the tokenizer {config.data.tokenizer!r} has {len(tok)} tokens but the encoder "
                      f"{config.encoder.name_or_path!r} embeds only {encoder.vocab_size}; use the encoder's own "
                      "tokenizer (--config.data.tokenizer) or an encoder with that vocabulary")
  encoder = _latent_stats(config, workdir, encoder, encoder_params, tok, language)
  model = ELF(ModelConfig.from_config(config))
  return Setup(config, mesh, tok, language, encoder, encoder_params, model)


def _latent_stats(config, workdir, encoder, encoder_params, tok, language) -> LatentEncoder:
  """Latent mean/std: from the config, or measured once from training data and kept in the workdir."""
  if not config.encoder.measure_latent_stats:
    return encoder
  path = fs.path(workdir) / LATENT_STATS_FILE if workdir else None
  saved = bool(path and path.exists())
  if jax.process_count() > 1:  # every process has looked before process 0 writes (no half-written reads)
    multihost_utils.sync_global_devices("latent stats looked up")
  if saved:
    stats = json.loads(path.read_text())
    return encoder.with_stats(stats["mean"], stats["std"])
  ds = pipeline.make_dataset(config, tok, config.data.split, language=language, seed=config.seed + 1)
  mean, std = measure_latent_stats(encoder, encoder_params, iter(ds))  # the same on every process
  if path and jax.process_index() == 0:
    path.write_text(json.dumps({"mean": mean, "std": std}))
  return encoder.with_stats(mean, std)


def steps_per_epoch(config, source_len: int) -> int:
  """Optimizer updates per epoch: `source_len // optim.global_batch_size` (the reference's rule; the partial last
  batch is dropped). `source_len`: examples in the training split."""
  per_epoch = source_len // config.optim.global_batch_size
  if per_epoch < 1:
    raise ConfigError(f"the training split {config.data.split!r} has {source_len} examples, fewer than one global "
                      f"batch (optim.global_batch_size={config.optim.global_batch_size}); lower "
                      "--config.optim.global_batch_size or use more data.")
  return per_epoch


def total_steps(config, per_epoch: int) -> int:
  """Optimizer updates of the run: `optim.num_steps` if > 0, else `round(optim.num_epochs * per_epoch)`."""
  if config.optim.num_steps > 0:
    return int(config.optim.num_steps)
  return max(1, int(round(config.optim.num_epochs * per_epoch)))


def abstract_and_shardings(setup: Setup, optimizer):
  """(abstract TrainState with shardings, TrainState of NamedShardings) without allocating anything."""
  seq = setup.config.data.max_length
  rng = jax.random.PRNGKey(setup.config.seed)
  boxed = jax.eval_shape(lambda: init_params(setup.model, rng, seq))
  specs = sharding.param_specs(boxed, sharding.rules_from_config(setup.config))
  shapes = jax.eval_shape(lambda: step_lib.init_state(setup.model, optimizer, rng, seq))
  sharding.check_divisible(shapes.params, specs, setup.mesh)
  shardings = sharding.state_shardings(setup.mesh, shapes, specs)
  abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                    shardings)
  return abstract, shardings


def create_state(setup: Setup, optimizer, shardings) -> TrainState:
  """A sharded fresh state (`jax.jit(init, out_shardings=...)`), optionally starting from `config.init_from`."""
  seq, config = setup.config.data.max_length, setup.config
  rng = jax.random.PRNGKey(config.seed)
  state = jax.jit(lambda: step_lib.init_state(setup.model, optimizer, rng, seq), out_shardings=shardings)()
  if config.init_from:
    expected = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    params = checkpoint.load_params_from(config.init_from, expected)
    params = jax.device_put(params, shardings.params)
    say(f"initialised params and EMA from {config.init_from}")
    ema = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the step donates params and EMA separately
    state = state.replace(params=params, ema_params=ema, opt_state=jax.jit(
        optimizer.init, out_shardings=shardings.opt_state)(params))
  return state


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's numpy batch (ids, masks and, with a latent cache, `latents`) → global arrays sharded over the
  batch axes."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}


def abstract_batch(config, mesh, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The ShapeDtypeStructs of one update's global batch (as `global_batch` makes it): ids (B, S) int32, valid /
  cond_mask / loss_mask (B, S) bool and, with a latent cache, latents (B, S, C) float32; sharded over the batch axes."""
  sh, rows = sharding.batch_sharding(mesh), (batch_size, config.data.max_length)
  batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32 if k == "ids" else jnp.bool_, sharding=sh)
           for k in step_lib.BATCH_KEYS}
  if config.data.latent_cache_dir:
    batch["latents"] = jax.ShapeDtypeStruct(rows + (config.encoder.dim,), jnp.float32, sharding=sh)
  return batch


class MetricsWriter:
  """metrics.jsonl (always) and TensorBoard event files (config.logging.tensorboard), process 0 only."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.active = jax.process_index() == 0
    self.path = str(fs.path(workdir) / "metrics.jsonl")
    self.tb = None
    if self.active and tensorboard:
      import tensorboardX  # optional at import time: only the writer needs it (it writes gs:// itself)
      self.tb = tensorboardX.SummaryWriter(str(fs.path(workdir) / "tb"))

  def write(self, step: int, metrics: dict[str, Any], kind: str = "train"):
    if not self.active:
      return
    row = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in metrics.items()}}
    fs.append_text(self.path, json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step" and np.isfinite(v):
          self.tb.add_scalar(f"{kind}/{k}", v, step)
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _nanmean(values) -> float:
  """Mean over the non-NaN values (e.g. decode_loss of steps that drew no decoding group); NaN if there are none."""
  v = np.asarray(values, np.float64)
  v = v[~np.isnan(v)]
  return float(v.mean()) if v.size else float("nan")


def _py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def plot_loss_curve(workdir: str) -> str | None:
  """Draws DIR/loss_curve.png from DIR/metrics.jsonl (train loss and its branches); returns the path."""
  path = fs.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return None
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if r.get("kind") == "train"]
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [r["step"] for r in rows]
  for key in ("loss", "denoise_loss", "decode_loss"):
    vals = [r.get(key, float("nan")) for r in rows]
    ax.plot(steps, vals, label=key)
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  ax.set_title("ELF training loss")
  fig.tight_layout()
  out = fs.savefig(fig, fs.path(workdir) / "loss_curve.png", dpi=120)
  plt.close(fig)
  return out


def train(config: ml_collections.ConfigDict, workdir: str, hooks=None, objective=None) -> TrainState:
  """Trains per `config` in `workdir` (auto-resuming), returns the final state.

  hooks: optional callable(setup, workdir, state, step, writer, final: bool) run every `logging.sample_every_steps` and
  at the end (sampling + evaluation, see `elf_jax.main`).
  objective: optional callable(setup, optimizer, state_shardings, encoder_params) → (train_step, frozen) replacing
  the ELF objective; the loop calls train_step(state, frozen, batch) → (state, metrics) (progressive
  distillation, `elf_jax.train.distill_loop`).
  """
  check_workdir(workdir)
  setup = build(config, workdir)
  mesh = setup.mesh
  say(mesh_lib.describe_mesh(mesh))
  source_len = len(sources.make_source(config.data, config.data.split, setup.language))
  per_epoch = steps_per_epoch(config, source_len)
  n_steps = total_steps(config, per_epoch)
  schedule = optim.make_schedule(config.optim, per_epoch, n_steps)
  optimizer = optim.make_optimizer(config.optim, schedule)
  abstract, shardings = abstract_and_shardings(setup, optimizer)

  batch_size = config.optim.global_batch_size  # the whole batch of an update; the step splits it in micro-batches
  micro_batch_size = batch_size // config.optim.grad_accum_steps
  dataset = pipeline.make_dataset(config, setup.tokenizer, config.data.split, language=setup.language,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  batch_size=batch_size)
  data_iter = iter(dataset)
  manager = checkpoint.CheckpointManager(checkpoint.checkpoint_dir(workdir), max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
  state = manager.restore(abstract, data_iterator=data_iter)
  if state is None:
    state = create_state(setup, optimizer, shardings)
    say(f"starting from scratch: {n_steps} optimizer steps ({per_epoch} per epoch), workdir {workdir}")
  else:
    say(f"resumed from step {int(state.step)} of {n_steps} ({checkpoint.checkpoint_dir(workdir)})")
  start = int(state.step)
  # Registers the first step with jax's multi-host preemption service before the first step's long compile, so that
  # a SIGTERM from now on stops every process at one step (True: at this one, already saved); False single-process.
  stop = multihost_utils.reached_preemption_sync_point(start)

  encoder_params = jax.device_put(setup.encoder_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if objective is None:
    obj = step_lib.Objective(setup.model, setup.encoder, loss_lib.FlowConfig.from_config(config),
                             step_lib.resolve_num_groups(config, mesh, micro_batch_size), config.data.conditional)
    train_step, frozen = step_lib.make_train_step(obj, optimizer, config.optim, mesh, shardings), encoder_params
  else:
    train_step, frozen = objective(setup, optimizer, shardings, encoder_params)
  # Out of memory stops here, before the first step, with the knobs to turn (the first step reuses this compile).
  hbm.check_step_fits(train_step, (state, frozen, abstract_batch(config, mesh, batch_size)), mesh, config)
  writer = MetricsWriter(workdir, config.logging.tensorboard)
  previous_sigterm = signal.getsignal(signal.SIGTERM)
  preempted = checkpoint.install_preemption_handler()
  # A live bar on a terminal; one line per logging interval when output goes to a file (pod logs, nohup, CI).
  interactive = sys.stderr.isatty()
  bar = tqdm.tqdm(total=n_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0 or not interactive)
  step, window, t_last = start, [], time.perf_counter()
  try:
    while step < n_steps and not stop:
      state, metrics = train_step(state, frozen, global_batch(mesh, next(data_iter)))
      step += 1
      window.append(metrics)
      bar.update(1)
      if step % config.logging.log_every_steps == 0 or step == n_steps:
        host = jax.device_get(window)
        now = time.perf_counter()
        summary = {k: _nanmean([m[k] for m in host]) for k in host[0]}
        # The lr of update `step`: optax's schedule counts the updates before it.
        summary.update(lr=float(schedule(step - 1)), step_time_s=(now - t_last) / len(window),
                       epoch=step / per_epoch)
        window, t_last = [], now
        writer.write(step, summary)
        if interactive:
          bar.set_postfix(loss=f"{summary['loss']:.4f}", s_per_step=f"{summary['step_time_s']:.3f}")
        else:
          eta = int(summary["step_time_s"] * (n_steps - step))
          say(f"train step {step}/{n_steps}  loss {summary['loss']:.4f}  {summary['step_time_s']:.3f} s/step  "
              f"ETA {eta // 60}:{eta % 60:02d}")
      stop = preempted(step)  # once per step on every process: multi-host runs agree on the step here
      if step % config.checkpoint.every_steps == 0 or step == n_steps or stop:
        manager.save(step, state, data_iter, force=True)
      if stop:
        break
      every = config.logging.sample_every_steps
      if hooks is not None and every > 0 and step % every == 0 and step < n_steps:
        hooks(setup, workdir, state, step, writer, False)
  finally:
    signal.signal(signal.SIGTERM, previous_sigterm)  # SIGTERM during sampling / after training ends the process
    bar.close()
    manager.wait()
  if stop:
    say(f"SIGTERM received: saved step {step} to {workdir}; exiting (rerun the same command to resume)")
  if step >= n_steps:
    if jax.process_index() == 0:
      plot_loss_curve(workdir)
    if hooks is not None:
      hooks(setup, workdir, state, step, writer, True)
  writer.close()
  manager.close()
  return state
