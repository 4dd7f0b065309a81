"""Keras SGD with two of airbench's options, for the recipes that ask for them (`make_optimizer`).

Lookahead (`ema`): an average of the weights that the weights are reset to every few steps, its
momentum ramped from 0 at the first step to `ema_momentum` at the last, as momentum·(step/total)^ramp.
Early on the average follows the weights (nothing is held back while they move fast); later it
smooths the last steps' noise. The averages are optimizer variables: they are in every checkpoint
and restored with it, so a resumed run continues bit-identically.

A faster rate for BatchNorm offsets (`norm_bias_rate`): airbench trains them at 64x the rate of the
weights. Without a scale (gamma) the offsets are the only per-channel parameters, and at the
weights' rate they barely move in a 10-epoch run."""

from __future__ import annotations

import keras
from keras import ops

NORM_BIAS = "beta"  # the name Keras gives a BatchNormalization's offset variable


@keras.saving.register_keras_serializable(package="cifarflow")
class SGD(keras.optimizers.SGD):
    def __init__(self, total_steps: int = 1, ema_ramp: float = 0.0, norm_bias_rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total_steps, self.ema_ramp, self.norm_bias_rate = total_steps, ema_ramp, norm_bias_rate

    def update_step(self, gradient, variable, learning_rate):
        # under tf.distribute (fit's path) `variable` is the tf.Variable: ".../<layer>/beta:0"
        if self.norm_bias_rate != 1 and variable.name.rsplit("/", 1)[-1].split(":")[0] == NORM_BIAS:
            learning_rate = ops.multiply(ops.cast(learning_rate, variable.dtype), self.norm_bias_rate)
        super().update_step(gradient, variable, learning_rate)

    def _update_model_variables_moving_average(self, trainable_variables):  # keras' hook for the EMA
        progress = ops.minimum(ops.cast(self.iterations, "float32") / self.total_steps, 1.0)
        momentum = self.ema_momentum * ops.power(progress, self.ema_ramp)
        for var, average in zip(trainable_variables, self._model_variables_moving_average, strict=True):
            if average is not None:
                m = ops.cast(momentum, var.dtype)
                average.assign(m * average + (1 - m) * var)

    def get_config(self) -> dict:
        return super().get_config() | {
            "total_steps": self.total_steps,
            "ema_ramp": self.ema_ramp,
            "norm_bias_rate": self.norm_bias_rate,
        }
