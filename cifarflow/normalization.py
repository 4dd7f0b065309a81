"""The recipes' input normalizations (named in cifarflow.pixels), as TensorFlow ops on float32 images (..., 32, 32, 3) in
pixel units [0, 255]. Used by the input pipeline and, inside the graph, by the exported model."""

from __future__ import annotations

import tensorflow as tf

from cifarflow.pixels import NORMALIZATIONS

MINMAX_EPSILON = 1e-7  # as FastEstimator's Minmax: flat images do not divide by zero


def normalize(images: tf.Tensor, kind: str) -> tf.Tensor:
    """uint8 or float pixels -> float32, per the recipe (per-image statistics over H, W, C)."""
    x = tf.cast(images, tf.float32)
    if kind == "center":  # seed 003: x/255 - 0.5
        return x / 255.0 - 0.5
    if kind == "minmax":  # seeds 000/001: (x - min) / (max - min), per image
        low = tf.reduce_min(x, axis=[-3, -2, -1], keepdims=True)
        high = tf.reduce_max(x, axis=[-3, -2, -1], keepdims=True)
        return (x - low) / tf.maximum(high - low, MINMAX_EPSILON)
    if kind == "standardize":  # seed 002: tf.image.per_image_standardization
        return tf.image.per_image_standardization(x)
    raise ValueError(f"unknown normalization {kind!r}; valid: {', '.join(NORMALIZATIONS)}")
