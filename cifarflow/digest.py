"""A digest of a model's weights: the deterministic identity of a trained model (saved model
files embed timestamps, so their bytes differ run to run even when the weights do not)."""

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
