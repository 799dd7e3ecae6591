"""Learning-rate schedules: linear warmup from 0, then cosine / cosine with hard restarts / linear /
constant / step.

One closed-form function per schedule (rather than optax.join_schedules) so that the value at any step
can be read off the formula in the docstring, and tests can check it against plain Python.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp

SCHEDULES = ("cosine", "cosine_restarts", "linear", "constant", "step")

Schedule = Callable[[object], jnp.ndarray]


def make_schedule(
    kind: str,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    end_lr_factor: float = 0.0,
    step_boundaries: Sequence[float] = (0.6, 0.9),
    step_factor: float = 0.1,
    num_cycles: int = 1,
) -> Schedule:
    """Returns step -> learning rate (float32 scalar), jit-friendly.

    lr(s) = main(s) * min(1, s / warmup_steps)   (the warmup factor is 1 when warmup_steps == 0)
    with p = clip((s - warmup_steps) / (total_steps - warmup_steps), 0, 1) and end = lr * end_lr_factor:
      cosine:   end + (lr - end) * (1 + cos(pi * p)) / 2
      cosine_restarts: end + (lr - end) * (1 + cos(pi * ((num_cycles * p) % 1))) / 2 for p < 1, end
                for p >= 1: `num_cycles` cosines from lr to end, each restarting at lr (Hugging Face's
                get_cosine_with_hard_restarts_schedule_with_warmup when end_lr_factor = 0; num_cycles=1
                is `cosine`)
      linear:   lr + (end - lr) * p
      constant: lr
      step:     lr * step_factor ** #{b : s >= round(b * total_steps)}  for b in step_boundaries
    Decay is measured from the end of warmup so the peak lr is reached exactly when warmup ends, and
    the schedule holds its final value after total_steps (a resumed run that overshoots stays sane).
    Arguments are validated by the caller (eojax.optim.build), which names the config keys.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {SCHEDULES}")
    lr = float(lr)
    end = lr * float(end_lr_factor)
    warmup = int(warmup_steps)
    decay_span = max(int(total_steps) - warmup, 1)
    boundaries = tuple(int(round(float(b) * total_steps)) for b in step_boundaries)
    factor = float(step_factor)
    cycles = int(num_cycles)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - warmup) / decay_span, 0.0, 1.0)
        if kind == "cosine":
            main = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        elif kind == "cosine_restarts":
            # The position in the cycle as (n * d mod span) / span rather than (n * p) % 1: exact for
            # integer steps (n * d below 2**24), so a restart lands on its step. The float form (Hugging
            # Face's, even in float64) rounds to just below 1 at some restarts (n=22: step 15 of 22) and
            # gives ~0 there, one step before the restart it then makes.
            d = jnp.clip(s - warmup, 0.0, decay_span)
            cycle = jnp.mod(cycles * d, decay_span) / decay_span
            main = jnp.where(p >= 1.0, end, end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * cycle)))
        elif kind == "linear":
            main = lr + (end - lr) * p
        elif kind == "constant":
            main = jnp.full((), lr, jnp.float32)
        else:  # step
            passed = sum((s >= b).astype(jnp.float32) for b in boundaries) if boundaries else 0.0
            main = lr * jnp.power(jnp.float32(factor), passed)
        if warmup > 0:
            main = main * jnp.minimum(s / warmup, 1.0)
        return jnp.asarray(main, jnp.float32)

    return schedule
