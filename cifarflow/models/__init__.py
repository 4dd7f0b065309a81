"""Model families as a registry from name to builder, each with a tiny variant for tests."""

from cifarflow.models.registry import FAMILIES, build_model

__all__ = ["FAMILIES", "build_model"]
