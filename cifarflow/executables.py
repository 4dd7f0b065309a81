"""The environment's own commands (dvc, cifarflow, prefect): found beside the running Python, so the
venv's copy runs even when PATH lacks the venv. Standard library only: cifarflow.tasks and cifarflow.flows import it."""

from __future__ import annotations

import sys
from pathlib import Path


def beside_python(name: str) -> str:
    """The path of `name` in the running interpreter's bin folder if it is there, else `name` (found on PATH)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name
