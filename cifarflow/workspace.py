"""`cifarflow workspace PROFILE`: a private copy of the project in which a profile runs (`make pipeline
PROFILE=smoke`), so trying the pipeline never edits the project's params.yaml or replaces its data/.

The copy (`runs/<profile>/`, git-ignored and DVC-ignored) holds the project's files as they are now,
committed or not, with `profile: <profile>` selected in its own params.yaml; it is its own git and
DVC repository, so its outputs, dvc.lock and cache stay there for the user to look at, and a
second run is incremental.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cifarflow.errors import InputError
from cifarflow.params_file import set_keys

RUNS = "runs"  # in .gitignore and .dvcignore


def project_files(project: Path) -> list[str]:
    """The files a clone would have, plus new files not ignored: what the user is working on."""
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=project, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise InputError(f"{project}: not a git checkout of the project ({done.stderr.strip()[:200]})")
    return [f for f in done.stdout.split("\0") if f and (project / f).is_file() and not f.startswith(f"{RUNS}/")]


def prepare(project: Path, profile: str) -> Path:
    """Create or refresh `runs/<profile>/` from the project; return its path."""
    project = Path(project).resolve()
    target = project / RUNS / profile
    if target.resolve().parent != project / RUNS:  # profile names are checked by config; keep it that way
        raise InputError(f"profile {profile[:40]!r} would not make a folder directly in {project / RUNS}")
    target.mkdir(parents=True, exist_ok=True)
    for rel in project_files(project):
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, destination)
    if not (target / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    set_keys(target / "params.yaml", {"profile": profile})
    # A commit of the snapshot, so the copy behaves as a clone (DVC experiments need one).
    git = ["git", "-c", "user.name=cifarflow", "-c", "user.email=cifarflow@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run(
        [*git, "commit", "-q", "--allow-empty", "-m", f"snapshot of {project} for profile {profile}"],
        cwd=target,
        check=True,
        capture_output=True,
    )
    return target
