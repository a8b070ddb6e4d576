"""TrainState: everything a training run carries from step to step (and into every checkpoint)."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Params, EMA params, optimizer state, step and RNG.

  Attributes:
    step: int32 scalar, number of optimizer updates applied (one per train step, whatever its micro-batch count).
    params: the flow transformer's parameter tree (float32).
    ema_params: exponential moving average of `params`, updated once per optimizer update.
    opt_state: optax state of Muon or AdamW.
    rng: PRNG key (raw uint32[2]); each step splits off its own key, and micro-batch j uses fold_in(that key, j).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
