"""Prefect flows that drive the DVC stages, and their deployment entry points."""
