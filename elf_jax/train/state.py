"""TrainState: everything a training run carries from step to step (and into every checkpoint)."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Params, EMA params, optimizer state, step and RNG.

  Attributes:
    step: int32 scalar, number of optimizer updates applied (micro-steps of gradient accumulation do not count).
    params: the flow transformer's parameter tree (float32).
    ema_params: exponential moving average of `params`, updated on optimizer steps only.
    opt_state: optax state (Muon or AdamW, including the gradient-accumulation wrapper when used).
    rng: PRNG key (raw uint32[2]) from which each step's randomness is folded in by step number.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
