"""FastEstimator's LeNet (seed 001): conv32-pool-conv64-pool-conv64, dense 64, dense 10 softmax.

Valid padding throughout, as in fe.architecture.LeNet. 122,570 parameters on 32x32x3.
"""

from __future__ import annotations

import keras
from keras import layers

from cifarflow.models.catalog import Variant
from cifarflow.pixels import IMAGE_SHAPE

# conv1, conv2, conv3 filters and fc1 units, per variant (catalog.VARIANTS)
CONFIGS: dict[Variant, tuple[int, int, int, int]] = {"full": (32, 64, 64, 64), "tiny": (8, 16, 16, 16)}


def build(num_classes: int = 10, variant: Variant = "full") -> keras.Model:
    c1, c2, c3, dense = CONFIGS[variant]
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(c1, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(c2, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(c3, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"lenet_{variant}")
