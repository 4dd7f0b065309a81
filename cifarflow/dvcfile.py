"""dvc.yaml, read as data: the stage graph is written there and only there, and the code that needs
to know it as data (the params check, the champion-folder rules, the flow's stage outputs) reads it
here, parsed once per process and folder; the stage order comes from DVC's own graph
(cifarflow.tasks.stages.pipeline_order). No DVC import: this is plain YAML."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cifarflow.bounded_yaml import read_yaml
from cifarflow.errors import CifarflowError

DVC_FILE = "dvc.yaml"
FOREACH_ARCHS = "${archs}"  # the train and evaluate stages: one stage per entry of params' archs


@functools.cache
def _stages(path: Path, version: tuple[int, ...]) -> dict[str, Any]:
    try:
        stages = (read_yaml(path) or {}).get("stages") or {}
    except (CifarflowError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def dvc_stages(root: Path) -> dict[str, Any]:
    """The `stages:` mapping of `root`/dvc.yaml; empty when the file is missing or unreadable. Parsed
    once per process and version of the file (its inode, size and times), however often it is asked."""
    path = Path(root).resolve() / DVC_FILE
    try:
        info = path.stat()
    except OSError:
        return {}
    return _stages(path, (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))


def stage_body(stage: Any) -> dict[str, Any]:
    """What a stage declares (a `foreach` stage's `do:` block)."""
    if not isinstance(stage, dict):
        return {}
    body = stage.get("do", stage)
    return body if isinstance(body, dict) else {}


def missing_dvc_params(root: Path, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage, key) for every params key that dvc.yaml's stages read and the document lacks (a
    `foreach: ${archs}` stage reads its keys once per architecture)."""
    missing = []
    for name, stage in dvc_stages(root).items():
        items: list[str | None] = [None]
        foreach = stage.get("foreach") if isinstance(stage, dict) else None
        if isinstance(foreach, str) and foreach.startswith("${") and foreach.endswith("}"):
            key = foreach[2:-1]
            if not has_path(raw, tuple(key.split("."))):  # DVC cannot even parse dvc.yaml without it
                missing.append((name, key))
        if foreach == FOREACH_ARCHS:
            items = [a for a in raw.get("archs") or [] if isinstance(a, str)]
        for item in items:
            for key in stage_body(stage).get("params") or []:
                if not isinstance(key, str):
                    continue  # {file: [keys]}: a whole file, or another params file
                key = key.replace("${item}", item) if item else key
                if not has_path(raw, tuple(key.split("."))):
                    missing.append((f"{name}@{item}" if item else name, key))
    return missing


def has_path(tree: Any, path: tuple[Any, ...]) -> bool:
    """Whether the nested mapping `tree` has the keys `path`, one level each."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def dvc_stage_outputs(root: Path) -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares as its outs, metrics and plots, as written there (a
    `foreach` stage's paths keep their `${item}`)."""
    return {
        name: [
            next(iter(entry)) if isinstance(entry, dict) else str(entry)
            for key in ("outs", "metrics", "plots")
            for entry in stage_body(stage).get(key) or []
        ]
        for name, stage in dvc_stages(root).items()
    }


def dvc_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml declares (outs, metrics, plots), as project-relative paths; a templated
    path (`data/models/${item}/...`) stands for the folder before its first `${`."""
    return [path.split("${", 1)[0].rstrip("/") or "." for paths in dvc_stage_outputs(root).values() for path in paths]
