"""The training loop: data → sharded train step → checkpoints, metrics, progress, periodic sample/eval hooks.

Everything static comes from `elf_jax.experiment.build` (mesh, encoder, network, step arithmetic, optimizer,
sharded state); everything numerical lives in pure modules (`objective/step.py`, `objective/loss.py`). What a person
sees: a progress bar with step time and ETA (one line per logging interval when the output is a file),
`DIR/metrics.jsonl`, TensorBoard events in `DIR/tb`, `DIR/loss_curve.png` at the end, samples in `DIR/samples/`
(the eval hook).
"""
from collections.abc import Callable
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from elf_jax import fs, report
from elf_jax.config import ConfigError
from elf_jax.data import pipeline
from elf_jax.eval import plots
from elf_jax.model import latents
from elf_jax.objective import step as step_lib
from elf_jax.objective.state import TrainState
from elf_jax.parallel import mesh as mesh_lib
from elf_jax.run import checkpoint, experiment, hbm, hub_upload


def _finite_mean(values) -> float:
  """Mean over the finite values (NaN marks e.g. decode_loss of steps that drew no decoding group, and a step skipped
  under optim.skip_nonfinite is left out); NaN if there are none."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


def summarize(window: list[dict], counted=("skipped_nonfinite",)) -> dict[str, float]:
  """One logging window's metrics (one host dict per step): means over the finite values; `counted` keys summed."""
  return {k: (float(np.sum([m[k] for m in window])) if k in counted else _finite_mean([m[k] for m in window]))
          for k in window[0]}


def check_finite(steps: list[int], host_metrics: list[dict], skip_nonfinite: bool) -> None:
  """Raises report.RunStopped at the first of `steps` whose loss or gradient norm is NaN / inf (unless such steps
  were skipped on the device: optim.skip_nonfinite)."""
  if skip_nonfinite:
    return
  for step, metrics in zip(steps, host_metrics):
    bad = [f"{k}={float(metrics[k])}" for k in step_lib.FINITE_METRICS if not np.isfinite(metrics[k])]
    if bad:
      raise report.RunStopped(
          f"training diverged at step {step} ({', '.join(bad)}); stopped before saving it, so the newest checkpoint "
          "is the last good one. Lower --config.optim.base_lr (or raise warm-up / grad_clip) and rerun, or set "
          "--config.optim.skip_nonfinite=True to skip such updates.")


def install_preemption_handler() -> Callable[[int], bool]:
  """Returns `preempted(step)`: True once SIGTERM has arrived, at a step every process agrees on.

  Every process calls `preempted(step)` after each optimizer step (the training loop registers its first step
  with jax's service before the first compile); once it returns True, all processes save that step together and
  stop. Single process: SIGTERM's handler is replaced by one that raises a flag (call from the main thread).
  Multi-process (jax.distributed initialised): jax's preemption service catches SIGTERM on every host and tells
  the others, and `multihost_utils.reached_preemption_sync_point` returns True on all processes at the same step,
  the one after the furthest process's latest call, so hosts notified at different steps, or only some hosts,
  stop together. Steps are absolute, as in orbax's own calls from `CheckpointManager.save`; a notice that reaches
  a resumed run before the first step is registered sets the sync step to 1 and is missed.
  """
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point
  received = threading.Event()

  def on_sigterm(signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting after the current step.")
    received.set()

  signal.signal(signal.SIGTERM, on_sigterm)
  return lambda step: received.is_set()


def measure_latent_stats(exp: experiment.Experiment, workdir: str) -> experiment.Experiment:
  """Training's first step when `encoder.measure_latent_stats`: the latent mean / std measured on the training
  split and saved as DIR/latent_stats.json, unless the run saved them before (`experiment.build` loaded them then).
  Returns `exp` with the measured statistics in its encoder."""
  config = exp.config
  if not config.encoder.measure_latent_stats:
    return exp
  path = experiment.latent_stats_path(workdir)
  saved = path.exists()
  if jax.process_count() > 1:  # every process has looked before process 0 writes (no half-written reads)
    multihost_utils.sync_global_devices("latent stats looked up")
  if saved:
    return exp
  ds = pipeline.make_dataset(config, exp.tokenizer, config.data.split, language=exp.language, seed=config.seed + 1)
  mean, std = latents.measure_latent_stats(exp.encoder, exp.encoder_params, iter(ds))  # the same on every process
  if jax.process_index() == 0:
    path.write_text(json.dumps({"mean": mean, "std": std}))
  return dataclasses.replace(exp, encoder=exp.encoder.with_stats(mean, std))


def elf_train_step(exp: experiment.Experiment) -> Callable:
  """The ELF objective's compiled train step (the default `build_step` of `train`)."""
  plan = exp.training_plan
  return step_lib.make_train_step(exp.elf_objective(), plan.optimizer, exp.config.optim, exp.mesh,
                                  plan.state_shardings)


@contextlib.contextmanager
def hold_workdir(workdir: str, config: ml_collections.ConfigDict):
  """One run per workdir: holds `workdir`'s lease (elf_jax.fs.workdir_lease) for the block and yields it (None on
  processes other than 0). Process 0 takes it; the others wait for the outcome and stop with it."""
  stale_after_s = config.checkpoint.lease_stale_after_s
  if jax.process_count() == 1:
    with fs.workdir_lease(workdir, stale_after_s) as lease:
      yield lease
    return
  with contextlib.ExitStack() as stack:
    error, lease = None, None
    try:
      lease = stack.enter_context(fs.workdir_lease(workdir, stale_after_s, take=jax.process_index() == 0))
    except ConfigError as e:
      error = e
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
      raise error
    if not taken:
      raise ConfigError(f"--workdir={workdir!r} is in use by another run (process 0 names it); pass another "
                        "--workdir")
    yield lease


def _close_quietly(manager: checkpoint.CheckpointManager) -> None:
  """Closes `manager` while an error is already on its way out (a second failure would only hide the first)."""
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    pass


def train(config: ml_collections.ConfigDict, workdir: str, eval_hook=None, build_step=None,
          teacher: str | None = None) -> TrainState:
  """Trains per `config` in `workdir` (auto-resuming), returns the final state.

  eval_hook: optional callable(exp, workdir, state, step, writer, final: bool) run every
  `logging.sample_every_steps` and at the end (sampling + evaluation: `elf_jax.run.modes.training_hook`).
  build_step: optional callable(exp) → train_step replacing `elf_train_step`; the loop calls
  train_step(state, frozen inputs, batch) → (state, metrics) (progressive distillation, `run.distill_loop`).
  teacher: the frozen teacher's checkpoint (distillation): its EMA params, sharded like the student's, join the
  step's frozen inputs.

  Raises:
    report.RunStopped: the run diverged, or a checkpoint save failed (one line each; nothing bad was saved).
    ConfigError: another run holds `workdir` (its lease), or a bad config value.
  """
  fs.check_writable(workdir, jax.process_index())
  with hold_workdir(workdir, config) as lease:
    return _train(config, workdir, eval_hook, build_step, teacher, lease)


def _train(config, workdir, eval_hook, build_step, teacher, lease) -> TrainState:
  """`train` inside the workdir's lease (None on processes other than 0), renewed at every log and save."""
  exp = measure_latent_stats(experiment.build(config, workdir, with_training_plan=True), workdir)
  plan, mesh = exp.training_plan, exp.mesh
  report.say(mesh_lib.describe_mesh(mesh))
  dataset = pipeline.make_dataset(config, exp.tokenizer, config.data.split, language=exp.language,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  batch_size=plan.global_batch_size)  # the step splits it into micro-batches
  data_iter = iter(dataset)
  manager = checkpoint.CheckpointManager(checkpoint.checkpoint_dir(workdir), max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
  try:
    state = manager.restore(plan.abstract_state, data_iterator=data_iter)
  except BaseException:
    _close_quietly(manager)  # no orbax thread or event loop left to complain at exit after the one-line error
    raise
  n_steps = plan.total_steps
  if state is None:
    state = exp.create_state()
    report.say(f"starting from scratch: {n_steps} optimizer steps ({plan.steps_per_epoch} per epoch), workdir "
               f"{workdir}")
  else:
    report.say(f"resumed from step {int(state.step)} of {n_steps} ({checkpoint.checkpoint_dir(workdir)})")
  start = int(state.step)
  # Registers the first step with jax's multi-host preemption service before the first step's long compile, so that
  # a SIGTERM from now on stops every process at one step (True: at this one, already saved); False single-process.
  stop = multihost_utils.reached_preemption_sync_point(start)

  frozen = step_lib.FrozenInputs(exp.replicated(exp.encoder_params),
                                 None if teacher is None else exp.load_sharded_params(teacher, "distill.teacher"))
  train_step = (build_step or elf_train_step)(exp)
  # Out of memory stops here, before the first step, with the knobs to turn (the first step reuses this compile).
  hbm.check_step_fits(train_step, (state, frozen, exp.abstract_batch()), mesh, config)
  writer = report.MetricsWriter(workdir, config.logging.tensorboard, config.logging.wandb_project,
                               config.to_dict())
  writer.drop_after(start)  # rows of steps this run is about to redo (a resume from an older step) are replaced
  previous_sigterm = signal.getsignal(signal.SIGTERM)
  preempted = install_preemption_handler()
  # A live bar on a terminal; one line per logging interval when output goes to a file (pod logs, nohup, CI).
  interactive = sys.stderr.isatty()
  bar = tqdm.tqdm(total=n_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0 or not interactive)
  # unchecked: (step, device metrics) not yet looked at on the host; window: host metrics of this logging interval.
  step, unchecked, window, t_last = start, [], [], time.perf_counter()
  try:
    while step < n_steps and not stop:
      state, metrics = train_step(state, frozen, exp.global_batch(next(data_iter)))
      step += 1
      unchecked.append((step, metrics))
      manager.check_saved()  # a failed asynchronous save stops the run here, one step after it failed
      bar.update(1)
      stop = preempted(step)  # once per step on every process: multi-host runs agree on the step here
      log = step % config.logging.log_every_steps == 0 or step == n_steps or stop
      save = step % config.checkpoint.every_steps == 0 or step == n_steps or stop
      if log or save:  # every step is checked for NaN / inf before anything is saved (one host fetch per check)
        host = jax.device_get([m for _, m in unchecked])
        check_finite([s for s, _ in unchecked], host, config.optim.skip_nonfinite)
        window, unchecked = window + host, []
        if lease is not None:
          lease.renew()
      if log:
        now = time.perf_counter()
        summary = summarize(window)
        # The lr of update `step`: optax's schedule counts the updates before it.
        summary.update(lr=float(plan.schedule(step - 1)), step_time_s=(now - t_last) / len(window),
                       epoch=step / plan.steps_per_epoch)
        window, t_last = [], now
        writer.write(step, summary)
        if interactive:
          bar.set_postfix(loss=f"{summary['loss']:.4f}", s_per_step=f"{summary['step_time_s']:.3f}")
        else:
          eta = int(summary["step_time_s"] * (n_steps - step))
          report.say(f"train step {step}/{n_steps}  loss {summary['loss']:.4f}  {summary['step_time_s']:.3f} s/step  "
                     f"ETA {eta // 60}:{eta % 60:02d}")
      if save:
        manager.save(step, state, data_iter, force=True)
        if config.checkpoint.hf_repo_id:
          manager.wait()  # the files of this step are complete before they are uploaded
          hub_upload.upload(workdir, config.checkpoint.hf_repo_id, f"checkpoint of step {step}")
      if stop:
        break
      every = config.logging.sample_every_steps
      if eval_hook is not None and every > 0 and step % every == 0 and step < n_steps:
        eval_hook(exp, workdir, state, step, writer, False)
    manager.wait()
  finally:
    signal.signal(signal.SIGTERM, previous_sigterm)  # SIGTERM during sampling / after training ends the process
    bar.close()
    if sys.exc_info()[0] is not None:  # leave nothing running at exit (orbax threads, tensorstore, TensorBoard)
      writer.close()
      _close_quietly(manager)
  if stop:
    report.say(f"SIGTERM received: saved step {step} to {workdir} (logged in metrics.jsonl); exiting (rerun the same "
               "command to resume)")
  if step >= n_steps:
    if jax.process_index() == 0:
      plots.loss_curve(workdir)
    if eval_hook is not None:
      eval_hook(exp, workdir, state, step, writer, True)
  writer.close()
  manager.close()
  if config.checkpoint.hf_repo_id:
    hub_upload.upload(workdir, config.checkpoint.hf_repo_id, "final checkpoint and results")
  return state
