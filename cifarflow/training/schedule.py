"""Learning-rate schedules per epoch, with their state as plain JSON so a run can resume them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cifarflow.config import Recipe


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


class LearningRate:
    """rate(epoch) before each epoch; update(logs) after it (only plateau uses the metrics)."""

    def __init__(self, recipe: Recipe, state: dict | None = None) -> None:
        self.schedule = recipe.schedule
        self.base = base_rate(recipe)
        self.state = ScheduleState(**state) if state else ScheduleState(rate=self.base)

    def rate(self, epoch: int) -> float:
        s = self.schedule
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
        """Keras ReduceLROnPlateau semantics: x factor after `patience` epochs without improvement."""
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
