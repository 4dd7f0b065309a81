"""Seed 003's 4-conv CNN: conv16-conv32-pool-conv32-conv64-pool, dense 256, LeakyReLU 0.1.

Faithful to the seed, quirks included: the first conv has a ReLU *and* a LeakyReLU, and the
last Dense(10) goes through LeakyReLU before the softmax. 1,084,234 parameters.
"""

from __future__ import annotations

import keras
from keras import layers

from cifarflow.models.catalog import Variant
from cifarflow.pixels import IMAGE_SHAPE

# conv1..conv4 filters and fc1 units, per variant (catalog.VARIANTS)
CONFIGS: dict[Variant, tuple[int, int, int, int, int]] = {"full": (16, 32, 32, 64, 256), "tiny": (4, 8, 8, 16, 32)}


def build(num_classes: int = 10, variant: Variant = "full") -> keras.Model:
    c1, c2, c3, c4, dense = CONFIGS[variant]
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(c1, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.LeakyReLU(0.1, name="conv1_leaky")(x)
    x = layers.Conv2D(c2, 3, padding="same", name="conv2")(x)
    x = layers.LeakyReLU(0.1, name="conv2_leaky")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Dropout(0.25, name="drop1")(x)
    x = layers.Conv2D(c3, 3, padding="same", name="conv3")(x)
    x = layers.LeakyReLU(0.1, name="conv3_leaky")(x)
    x = layers.Conv2D(c4, 3, padding="same", name="conv4")(x)
    x = layers.LeakyReLU(0.1, name="conv4_leaky")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Dropout(0.25, name="drop2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense, name="fc1")(x)
    x = layers.LeakyReLU(0.1, name="fc1_leaky")(x)
    x = layers.Dropout(0.5, name="drop3")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    x = layers.LeakyReLU(0.1, name="logits_leaky")(x)
    outputs = layers.Activation("softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"simple_cnn_{variant}")
