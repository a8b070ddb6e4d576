r"""Progressive distillation (docs/method.md#distillation) of the offline tiny default: a few-step student in minutes.

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
from elf_jax import recipes


def get_config():
  return recipes.tiny_distill()
