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


# Test-time views per level, and each view's weight in the average: level 1 is an image and its
# mirror; level 2 adds both, each mirrored too, shifted by one pixel up-left and down-right
# (reflect padding), weighted as airbench's infer_mirror_translate: 1/4, 1/4, then 1/8 each.
VIEW_WEIGHTS = {1: (0.5, 0.5), 2: (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}


class _ViewLayer(layers.Layer):
    """A test-time-augmentation layer of a given level (a key of VIEW_WEIGHTS), saved with it."""

    def __init__(self, level: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.level = level

    def get_config(self) -> dict:
        return super().get_config() | {"level": self.level}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TestTimeViews(_ViewLayer):
    """Test-time augmentation, first half: at inference the N images become V·N rows, view by view
    (VIEW_WEIGHTS[level]); in training they pass through. `MergeViews` folds the rows back."""

    def call(self, x, training=None):
        if training:
            return x
        views = [x, ops.flip(x, axis=2)]
        if self.level == 2:
            padded = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")
            for shifted in (padded[:, :-2, :-2, :], padded[:, 2:, 2:, :]):
                views += [shifted, ops.flip(shifted, axis=2)]
        return ops.concatenate(views, axis=0)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MergeViews(_ViewLayer):
    """Test-time augmentation, second half: the weighted mean of each image's views' outputs (logits)."""

    def call(self, x, training=None):
        if training:
            return x
        weights = VIEW_WEIGHTS[self.level]
        views = ops.reshape(x, (len(weights), -1, x.shape[-1]))
        return ops.sum(views * ops.reshape(ops.convert_to_tensor(weights, x.dtype), (-1, 1, 1)), axis=0)


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
