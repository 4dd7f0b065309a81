"""Where the champion registry lives: `export.champion_dir` (or `--champion`), resolved one way for
every reader and writer (export's comparison, promote, predict, the params check): `~` expanded, a
relative path taken from the project folder (the folder of the params file), and the folder checked
to be a folder of its own."""

from __future__ import annotations

import os
from pathlib import Path

from cifarflow.dvcfile import dvc_outputs
from cifarflow.redact import short

DEFAULT_CHAMPION_DIR = "champion"


def champion_dir(value: str, project: Path) -> Path:
    """The registry folder `value` names, for the project in `project`; ValueError naming the rule it breaks."""
    check_champion_dir(value, project)
    return _lexical(value, Path(project).resolve())


def _lexical(value: str, root: Path) -> Path:
    given = Path(os.path.expanduser(value))
    return Path(os.path.normpath(given if given.is_absolute() else root / given))


def check_champion_dir(value: str, root: Path) -> None:
    """The champion registry must be a folder of its own: not inside data/, a DVC output, .git or
    .dvc (a rerun or checkout would delete or replace it), not the project or one of its ancestors
    (promote would move the project), and not a symlink or a file. Raises ValueError naming the path."""
    if not value.strip() or "\0" in value:
        raise ValueError(f"{short(value)} is not a folder path")
    try:
        _check(value, Path(root).resolve())
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission
        raise ValueError(f"{short(value)} cannot be used: {exc.__class__.__name__}: {short(str(exc), 200)}") from None


def _check(value: str, root: Path) -> None:
    lexical = _lexical(value, root)
    resolved = lexical.resolve()
    if lexical == Path("/") or resolved == Path("/"):
        raise ValueError(f"{short(value)} is the filesystem root /; use a folder of its own, e.g. {DEFAULT_CHAMPION_DIR}")
    forbidden = {"data": "data/ (DVC's outputs)", ".git": ".git", ".dvc": ".dvc"}
    forbidden |= {out: f"the DVC output {out}" for out in dvc_outputs(root)}
    for candidate in {lexical, resolved}:
        if candidate == root:
            raise ValueError(
                f"{short(value)} is the project folder itself ({root}); use a folder of its own, e.g. {DEFAULT_CHAMPION_DIR}"
            )
        if candidate in root.parents:
            raise ValueError(
                f"{short(value)} ({candidate}) is an ancestor of the project folder {root}; use a "
                f"folder of its own, e.g. {DEFAULT_CHAMPION_DIR}"
            )
        for rel, label in forbidden.items():
            inside = root / rel
            if candidate == inside or inside in candidate.parents:
                raise ValueError(
                    f"{short(value)} ({candidate}) lies inside {label}; `dvc repro` or a checkout "
                    f"would delete or replace it. Use a folder of its own, e.g. {DEFAULT_CHAMPION_DIR}"
                )
    if lexical.is_symlink():
        raise ValueError(f"{lexical} is a symlink; the registry must be a real folder (remove the link)")
    if lexical.exists() and not lexical.is_dir():
        raise ValueError(f"{lexical} exists and is not a folder; move it away or choose another path")
