"""Prefect flows that drive the DVC stages (see the Prefect orchestration issue)."""
