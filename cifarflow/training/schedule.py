"""Learning-rate schedules: per epoch, with their state as plain JSON so a run can resume them; or
per optimizer step (warmup_linear), inside the optimizer as a function of its step counter, which
the checkpoint holds, so a resumed run continues on the same curve."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import keras
from keras import ops

from cifarflow.settings import Recipe

PER_STEP = ("warmup_linear",)


def base_rate(recipe: Recipe) -> float:
    """The recipe's rate for its batch: seed 002 scales 0.1 per 128 examples linearly."""
    rate = recipe.optimizer.learning_rate
    reference = recipe.optimizer.lr_reference_batch
    return rate * recipe.batch_size / reference if reference else rate


@dataclass
class ScheduleState:
    """What a plateau schedule remembers between epochs (the other kinds are pure functions)."""

    rate: float
    best: float | None = None
    wait: int = 0


@keras.saving.register_keras_serializable(package="cifarflow")
class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
    """peak × (start → 1 linearly over the first `warmup` fraction of `total_steps`, then → end
    linearly at the last step): airbench's triangular schedule."""

    def __init__(self, peak: float, total_steps: int, warmup: float, start: float, end: float) -> None:
        self.peak, self.total_steps, self.warmup, self.start, self.end = peak, total_steps, warmup, start, end

    def __call__(self, step):
        t = ops.cast(step, "float32") / self.total_steps
        rising = self.start + (1 - self.start) * t / max(self.warmup, 1e-12)
        falling = 1 + (self.end - 1) * (t - self.warmup) / (1 - self.warmup)
        return self.peak * ops.where(t < self.warmup, rising, falling)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup, "start": self.start, "end": self.end}


class LearningRate:
    """rate(epoch) before each epoch; update(logs) after it (only plateau uses the metrics). A
    per-step schedule is the optimizer's own (`for_optimizer`); `rate` then reads it at the epoch's
    first step. `steps_per_epoch` counts the optimizer's steps (micro-steps under accumulation)."""

    def __init__(self, recipe: Recipe, state: dict | None = None, steps_per_epoch: int = 0) -> None:
        self.schedule = recipe.schedule
        self.base = base_rate(recipe)
        self.state = ScheduleState(**state) if state else ScheduleState(rate=self.base)
        self.per_step = self.schedule.kind in PER_STEP
        if self.per_step and steps_per_epoch < 1:
            raise ValueError("a per-step schedule needs the number of steps per epoch")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(recipe.epochs * steps_per_epoch, 1)

    def for_optimizer(self, epoch: int) -> float | WarmupLinear:
        """What the optimizer is built with: the per-step schedule, or the rate of `epoch`."""
        if not self.per_step:
            return self.rate(epoch)
        s = self.schedule
        return WarmupLinear(self.base, self.total_steps, s.warmup, s.start, s.end)

    def rate(self, epoch: int) -> float:
        s = self.schedule
        if self.per_step:
            return float(self.for_optimizer(epoch)(epoch * self.steps_per_epoch))
        if s.kind == "exponential":  # seed 003: INIT_LR * 0.9 ** epoch
            return self.base * s.decay**epoch
        if s.kind == "step":  # seed 002: x0.1 from epoch 30, x0.01 from epoch 45
            multiplier = 1.0
            for boundary, value in zip(s.boundaries, s.multipliers, strict=True):
                if epoch >= boundary:
                    multiplier = value
            return self.base * multiplier
        return self.state.rate  # constant, or plateau's current rate

    def update(self, logs: dict[str, float]) -> None:
        """Keras ReduceLROnPlateau's rule with its defaults min_delta=0 and cooldown=0: x factor after
        `patience` epochs in a row without a strict improvement of the monitored metric."""
        s = self.schedule
        if s.kind != "plateau":
            return
        value = logs[s.monitor]
        improved = self.state.best is None or (value < self.state.best if s.monitor == "val_loss" else value > self.state.best)
        if improved and not math.isnan(value):
            self.state.best, self.state.wait = value, 0
            return
        self.state.wait += 1
        if self.state.wait >= s.patience:
            self.state.rate, self.state.wait = max(self.state.rate * s.factor, s.min_lr), 0

    def to_dict(self) -> dict:
        return asdict(self.state)
