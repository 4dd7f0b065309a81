"""cifarflow: a reproducible CIFAR-10 training pipeline (library + CLI)."""

__version__ = "0.1.0"
