"""`--mode=distill`: the progressive-distillation curriculum (docs/method.md#distillation), a training run per round.

Round workdirs, the teacher and resuming: docs/running.md#distillation-runs.
"""
import json

from etils import epath
import jax
import ml_collections

from elf_jax import fs, report
from elf_jax.config import FEW_STEP_PRESET, ConfigError, parse_distill_rounds, resolve
from elf_jax.objective import distill as distill_lib
from elf_jax.objective import flow
from elf_jax.objective import step as step_lib
from elf_jax.objective.state import TrainState
from elf_jax.run import experiment, train_loop

ROUND_DONE_FILE = "round_done.json"
SUMMARY_KEYS = ("gen_ppl", "entropy", "gen_ppl_ratio", "entropy_ratio", "ungrammatical_fraction")


def round_dir(workdir: str, index: int, student_steps: int) -> epath.Path:
  """Workdir of round `index` (1-based): DIR/round<index>_<steps>step."""
  return fs.path(workdir) / f"round{index}_{student_steps}step"


def round_config(config: ml_collections.ConfigDict, student_steps: int, init_from: str) -> ml_collections.ConfigDict:
  """The training config of one round: `config` with the round's length and warm-up (`distill.*`), the student's
  initialisation, and few-step sampling at the student's step count."""
  c = ml_collections.ConfigDict(config.to_dict())
  d = config.distill
  c.init_from = init_from
  c.optim.num_steps = d.steps_per_round
  c.optim.num_epochs = d.epochs_per_round
  c.optim.warmup_steps = d.warmup_steps
  c.optim.warmup_epochs = d.warmup_epochs
  c.sample.preset = FEW_STEP_PRESET
  c.sample.steps = student_steps
  return c


def distill_step_builder(dc: distill_lib.DistillConfig):
  """The `build_step` of `train_loop.train` for one round: the compiled distillation step, whose frozen inputs
  carry the teacher's EMA params sharded like the student's."""

  def build_step(exp: experiment.Experiment):
    plan, config = exp.training_plan, exp.config
    obj = distill_lib.DistillObjective(exp.model, exp.encoder, flow.FlowConfig.from_config(config), dc,
                                       config.data.conditional)
    return step_lib.make_train_step(obj, plan.optimizer, config.optim, exp.mesh, plan.state_shardings,
                                    loss_fn=distill_lib.compute_loss, with_teacher=True)

  return build_step


def distill(config: ml_collections.ConfigDict, workdir: str, eval_hook=None) -> TrainState | None:
  """Runs (or resumes) every round of `config.distill.rounds` under `workdir`; returns the last state trained here.

  eval_hook: as in `train_loop.train` (sampling + evaluation of each round's student). Stops after a round that did
  not finish (SIGTERM); the same command resumes it.
  """
  d = config.distill
  if not d.teacher:
    raise ConfigError("distill.teacher is empty: set --config.distill.teacher to the teacher's training workdir "
                      "or checkpoint (e.g. runs/tiny, trained with --mode=train)")
  rounds = parse_distill_rounds(d.rounds)
  teacher = fs.path(d.teacher)
  if not teacher.exists():
    raise FileNotFoundError(f"distill.teacher={d.teacher!r} does not exist; train the teacher first (--mode=train) "
                            "or point it at a checkpoint")
  fs.check_writable(workdir, jax.process_index())
  init_from, state = config.init_from or str(teacher), None
  for index, (steps, sub_steps) in enumerate(rounds, 1):
    directory = round_dir(workdir, index, steps)
    if (directory / ROUND_DONE_FILE).exists():
      report.say(f"distillation round {index}/{len(rounds)} ({steps}-step student) finished before: {directory}")
      init_from = str(directory)
      continue
    report.say(f"distillation round {index}/{len(rounds)}: {steps}-step student, {sub_steps} teacher sub-steps per "
             f"student step, student from {init_from}, teacher {teacher}")
    directory.mkdir(parents=True, exist_ok=True)
    stats = teacher / experiment.LATENT_STATS_FILE  # the teacher's latent normalisation, not a new measurement
    if stats.exists() and not (directory / experiment.LATENT_STATS_FILE).exists():
      (directory / experiment.LATENT_STATS_FILE).write_text(stats.read_text())
    finished = []

    def round_eval_hook(exp, wd, st, step, writer, final):
      if eval_hook is not None:
        eval_hook(exp, wd, st, step, writer, final)
      if final:
        finished.append(step)

    rc = round_config(config, steps, init_from)
    if jax.process_index() == 0:
      (directory / "config_train.json").write_text(resolve(rc).to_json_best_effort(indent=2))
    dc = distill_lib.DistillConfig.from_config(rc, steps, sub_steps)
    state = train_loop.train(rc, str(directory), eval_hook=round_eval_hook, build_step=distill_step_builder(dc),
                             teacher=str(teacher))
    if not finished:
      report.say(f"distillation stopped in round {index}; rerun the same command to resume")
      return state
    if jax.process_index() == 0:
      (directory / ROUND_DONE_FILE).write_text(json.dumps(
          {"round": index, "student_steps": steps, "teacher_sub_steps": sub_steps, "optimizer_steps": finished[0],
           "init_from": init_from, "teacher": str(teacher)}))
    init_from = str(directory)
  report.say(summary_table(workdir, rounds))
  return state


def summary_table(workdir: str, rounds: list[tuple[int, int]]) -> str:
  """One line per round: its student's last evaluation (DIR/<round>/metrics.jsonl, kind "eval")."""
  lines = ["distilled students (sampled at their step counts, few-step settings):",
           "  round  steps  " + "  ".join(SUMMARY_KEYS)]
  for index, (steps, _) in enumerate(rounds, 1):
    evals = report.read_metrics(str(round_dir(workdir, index, steps)), kind="eval")
    last = evals[-1] if evals else {}
    cells = [f"{last[k]:>{len(k)}.4f}" if isinstance(last.get(k), float) else "-".rjust(len(k)) for k in SUMMARY_KEYS]
    lines.append(f"  {index:>5}  {steps:>5}  " + "  ".join(cells))
  return "\n".join(lines)
