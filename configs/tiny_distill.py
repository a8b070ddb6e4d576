r"""Progressive distillation (spec §11) of the offline tiny default: a few-step student in minutes on 2 CPU cores.

  python -m elf_jax.main --config=configs/tiny.py --workdir=runs/tiny                                   # teacher
  python -m elf_jax.main --config=configs/tiny_distill.py --workdir=runs/tiny_distill --mode=distill
  python -m elf_jax.main --config=configs/tiny_distill.py --workdir=runs/tiny_distill/round3_4step --mode=eval \
      --config.sample.steps=4                     # a round's student, then the sweep over steps 1-32 (steps.png)

The official curriculum (student 16 → 8 → 4 → 2 → 1 steps, teacher 4 → 64 Euler sub-steps per student step, the
original teacher's EMA in every round, each student from the previous round's EMA) with short rounds: the teacher
costs K + 1 forward passes per example, so a step of the last round (K = 64) costs about nine training steps of the
same batch. Five rounds of 100 steps took 13 minutes on a shared 2-core machine (README). Each round ends with 500
samples at the student's step count with the authors' few-step settings (`fewstep`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402  (configs are loaded by path; tiny holds the model, data and teacher recipe)


def get_config():
  c = tiny.get_config()
  c.distill.teacher = "runs/tiny"
  c.distill.rounds = "16:4,8:8,4:16,2:32,1:64"
  c.distill.steps_per_round = 100
  c.distill.warmup_steps = 10
  c.optim.global_batch_size = 64
  c.optim.base_lr = 4e-3  # lr = 4e-3 * 64 / 256 = 1e-3, constant after the warm-up (the authors' recipe shape)
  c.optim.schedule = "constant"
  c.optim.ema_decay = 0.98  # a ~50-step average of a 100-step round
  c.sample.preset = "fewstep"
  c.eval.sweep = "steps=1,2,4,8,16,32"  # --mode=eval: Gen. PPL and entropy against steps (DIR/steps.png)
  c.checkpoint.every_steps = 50
  c.logging.log_every_steps = 10
  return c
