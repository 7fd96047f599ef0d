"""Learning-rate schedules: the learning rate of each optimiser step, as HF transformers' schedulers give it.

    lr_at(schedule, step, lr, *, steps, warmup=0) -> float      the lr of step `step`, counted from 0
    factor(schedule, step, *, steps, warmup=0) -> float          the multiplier of the peak lr, in [0, 1]

HF builds a schedule as torch.optim.lr_scheduler.LambdaLR(optimizer, f): the optimiser's step t (from 0) uses
lr * f(t), f evaluated in Python floats. So does this module, with the same expressions in the same order (the
lr it returns is the float torch's optimiser would read). With S = steps, W = warmup, t the step:

    warm-up, t < W       t / W                            the first step's lr is 0 (its moments still count)
    constant             1                                get_constant_schedule_with_warmup (get_constant_schedule
                                                          when W = 0: then the lr is exactly `lr` at every step)
    linear               max(0, (S - t) / (S - W))        get_linear_schedule_with_warmup
    cosine               max(0, (1 + cos(pi p)) / 2),     get_cosine_schedule_with_warmup, num_cycles = 1/2:
                         p = (t - W) / (S - W)            one half-wave from the peak down to 0

The linear and cosine schedules reach 0 only at t = S, one step past the last: the last step's lr is small,
never zero. References: transformers/optimization.py (`_get_*_lr_lambda`), torch/optim/lr_scheduler.py.
"""

from __future__ import annotations

import math

from ..errors import ConfigError

SCHEDULES = ("constant", "cosine", "linear")


def factor(schedule: str, step: int, *, steps: int, warmup: int = 0) -> float:
    """The multiplier of the peak learning rate at step `step` (from 0) of `steps` (see the module docstring)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(steps - step) / float(max(1, steps - warmup)))
    if schedule == "cosine":
        progress = float(step - warmup) / float(max(1, steps - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # HF's pi * num_cycles * 2 * progress: pi exactly
    raise ConfigError(f"unknown --lr-schedule {schedule!r} (expected one of: {', '.join(SCHEDULES)})")


def lr_at(schedule: str, step: int, lr: float, *, steps: int, warmup: int = 0) -> float:
    """The learning rate of step `step` (from 0): lr * factor, the product LambdaLR computes."""
    return lr * factor(schedule, step, steps=steps, warmup=warmup)
