"""The custom Keras layers and initializers of the model families, registered so that a saved `.keras` file loads
wherever `cifarflow.models.registry.load_model` is used (training, evaluate, export, predict)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

PACKAGE = "cifarflow"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReshapeMaxPool(layers.Layer):
    """2x2 max pooling with stride 2 (odd sizes drop their last row/column, as `MaxPooling2D`
    does), written as reshape + max. Why: TensorFlow's MaxPool gradient has no deterministic XLA
    kernel on CPU, so with op determinism on a compiled step fails; reduce_max's gradient has one."""

    def call(self, x):
        h, w, c = x.shape[1] // 2, x.shape[2] // 2, x.shape[3]
        x = x[:, : 2 * h, : 2 * w, :]
        return ops.max(ops.reshape(x, (-1, h, 2, w, 2, c)), axis=(2, 4))

    def compute_output_shape(self, shape):
        return (shape[0], shape[1] // 2, shape[2] // 2, shape[3])


@keras.saving.register_keras_serializable(package=PACKAGE)
class FlipViews(layers.Layer):
    """Test-time augmentation, first half: at inference the batch becomes [images, mirrored
    images] (2N rows); in training it passes through. `AverageViews` folds the rows back."""

    def call(self, x, training=None):
        if training:
            return x
        return ops.concatenate([x, ops.flip(x, axis=2)], axis=0)


@keras.saving.register_keras_serializable(package=PACKAGE)
class AverageViews(layers.Layer):
    """Test-time augmentation, second half: the mean of the two views' outputs (logits) per image."""

    def call(self, x, training=None):
        if training:
            return x
        n = ops.shape(x)[0] // 2
        return (x[:n] + x[n:]) / 2


@keras.saving.register_keras_serializable(package=PACKAGE)
class Scale(layers.Layer):
    """Multiply by a constant (airbench's 1/9 on the logits: a softer start for the classifier)."""

    def __init__(self, factor: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self) -> dict:
        return super().get_config() | {"factor": self.factor}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PartialIdentity(keras.initializers.Initializer):
    """torch's default conv init (uniform +-1/sqrt(fan_in)), then the first min(in, out) filters set
    to pass their input channel through at the kernel's centre (airbench's `dirac_` on w[:in])."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def __call__(self, shape, dtype=None):
        base = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=self.seed)(shape, dtype)
        kh, kw, cin, cout = shape
        eye = np.zeros(shape, np.float32)
        keep = np.ones(shape, np.float32)
        n = min(cin, cout)
        keep[:, :, :, :n] = 0
        eye[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1
        return base * keep + eye

    def get_config(self) -> dict:
        return {"seed": self.seed}
