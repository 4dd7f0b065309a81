"""Prefect tasks, one per stage kind, each a subprocess around `dvc repro --single-item`."""
