"""A digest of a model's weights: the identity of a trained model whatever file holds it. Our
`.keras` files are byte-stable (cifarflow.keras_archive fixes their timestamps and shared-object ids),
but a SavedModel export's bytes differ run to run, and the same weights loaded from either must
be recognised as the same model: train writes this digest, export's model card and the champion
registry compare it."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def weights_digest(model: Any) -> str:
    """sha256 over every weight (trainable or not) in model order: path, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for weight in model.weights:
        array = np.ascontiguousarray(np.asarray(weight.numpy()))
        digest.update(f"{weight.path}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
