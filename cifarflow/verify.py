"""`cifarflow verify-repro`: "same params, same bytes", checked rather than assumed.

Two fresh clones of the repository (its committed HEAD) each run the smoke-profile `dvc repro`
on the same data; every deterministic output must then be byte-identical across the clones.
Also checked: `dvc status` is clean after the run, a second `dvc repro` runs nothing but the
always-changed stages and changes nothing, and a committed dvc.lock is not stale against the
committed code and params.

Outputs that record a run rather than its result are excluded, each for a stated reason, and
the report lists every excluded file so nothing is skipped silently.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifarflow import numerics
from cifarflow.contract import SUMMARY
from cifarflow.errors import NOT_RETRYABLE, CifarflowError, InputError, failure_class
from cifarflow.executables import beside_python
from cifarflow.fileio import hash_file, sha256_file

# (pattern, why it is not compared). Everything else under data/ must be byte-identical.
EXCLUDED = (
    ("data/runinfo/*", "run info: wall times, img/s, hardware, versions, TensorBoard event files"),
    ("data/downloads/*", "the download cache (the extracted data/raw it feeds is compared)"),
    (
        "data/export/served.json",
        "the sha256 of the SavedModel's files, which differ each time for the reason below; the model card "
        "holds what is reproducible of them (the variables' values and the labels), which is compared",
    ),
    (
        "data/export/saved_model/*",
        "TensorFlow writes a SavedModel differently each time (graph, variables "
        "layout, fingerprint); the served weights are compared through the model "
        "card's digest and its serving check. In dvc.lock, the hash of data/export "
        "is excluded for the same reason",
    ),
)
DVC_OUTPUT_LINE = re.compile(r"^Running stage '([^']+)'")
RESOLVED = "data/resolved"  # the resolve stage's folder (dvc.yaml): each stage's settings file is a dep in it
FAILURE_LINES = 25  # a failed command's last output lines in the error: where DVC and tracebacks say why


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    compared: int = 0
    excluded: dict[str, list[str]] = field(default_factory=dict)  # reason -> files
    hosts: list[str] = field(default_factory=list)  # how the trainings' hosts compare (cifarflow.numerics)

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def render(self) -> str:
        lines = [f"compared {self.compared} output files byte for byte (dvc.lock entry by entry)", *self.hosts]
        for reason, files in self.excluded.items():
            lines.append(f"excluded {len(files)} file(s): {reason}")
            lines += [f"    {name}" for name in files]
        if self.problems:
            lines.append(f"NOT REPRODUCIBLE: {len(self.problems)} problem(s)")
            lines += [f"  - {problem}" for problem in self.problems]
        else:
            lines.append(
                "reproducible: every deterministic output is identical; dvc status clean; a second dvc repro changed nothing"
            )
        return "\n".join(lines)


def exclusion(path: str) -> str | None:
    for pattern, reason in EXCLUDED:
        if fnmatch.fnmatch(path, pattern):
            return reason
    return None


def snapshot(workspace: Path) -> dict[str, str]:
    """sha256 of every file under data/ (relative paths), plus dvc.lock."""
    files = {str(p.relative_to(workspace)): sha256_file(p) for p in sorted((workspace / "data").rglob("*")) if p.is_file()}
    lock = workspace / "dvc.lock"
    if lock.is_file():
        files["dvc.lock"] = sha256_file(lock)
    return files


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def describe_difference(name: str, a: Path, b: Path) -> str:
    """Name the output and, for JSON metrics, the values that differ; for text, the first line."""
    if name.endswith(".json"):
        left, right = flatten(json.loads(a.read_text())), flatten(json.loads(b.read_text()))
        keys = sorted(k for k in left.keys() | right.keys() if left.get(k, "<missing>") != right.get(k, "<missing>"))
        shown = ", ".join(f"{k}: {left.get(k, '<missing>')} != {right.get(k, '<missing>')}" for k in keys[:8])
        return f"{name} differs in {len(keys)} value(s): {shown}{' ...' if len(keys) > 8 else ''}"
    if name.endswith((".csv", ".md", ".txt", ".sha256", ".lock")):
        for number, (x, y) in enumerate(zip(a.read_text().splitlines(), b.read_text().splitlines(), strict=False), 1):
            if x != y:
                return f"{name} differs first at line {number}: {x[:120]!r} != {y[:120]!r}"
        return f"{name} differs in length"
    return f"{name} differs ({a.stat().st_size:,} vs {b.stat().st_size:,} bytes)"


def lock_entries(workspace: Path, excluded: set[str]) -> dict[str, Any]:
    """dvc.lock per stage, without the hashes of outputs (and deps) that hold excluded files (a
    directory's hash covers all its files): those files are compared, or excluded, one by one."""
    stages = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    for stage in stages.values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            if any(name == entry["path"] or name.startswith(f"{entry['path']}/") for name in excluded):
                entry.update(md5="<excluded>", size=None, nfiles=None)
    return stages


def compare_locks(a: Path, b: Path, excluded: set[str], report: Report) -> None:
    left, right = lock_entries(a, excluded), lock_entries(b, excluded)
    for stage in sorted(left.keys() | right.keys()):
        x, y = flatten(by_path(left.get(stage, {}))), flatten(by_path(right.get(stage, {})))
        keys = sorted(k for k in x.keys() | y.keys() if x.get(k, "<missing>") != y.get(k, "<missing>"))
        if keys:
            shown = ", ".join(f"{k}: {x.get(k, '<missing>')} != {y.get(k, '<missing>')}" for k in keys[:4])
            report.fail(f"dvc.lock differs for stage {stage}: {shown}{' ...' if len(keys) > 4 else ''}")


def by_path(stage: dict[str, Any]) -> dict[str, Any]:
    """deps and outs keyed by their path, so a difference is named by it."""
    return {key: {e["path"]: e for e in value} if key in ("deps", "outs") else value for key, value in stage.items()}


def compare_hosts(a: Path, b: Path) -> list[str]:
    """One line per training: whether the two workspaces' runs were on comparable hosts, and if not, how
    they differ (a byte difference between two kinds of host is the machine's, not necessarily a bug)."""
    lines = []
    for summary in sorted((a / "data/models").glob(f"*/{SUMMARY}")):
        other = b / summary.relative_to(a)
        if not other.is_file():
            continue
        mine, theirs = (json.loads(p.read_text()).get("numerics") for p in (summary, other))
        differ = numerics.differences(mine, theirs)
        arch = summary.parent.name
        lines.append(
            f"hosts of train@{arch}: comparable ({numerics.describe(mine)})"
            if not differ
            else f"hosts of train@{arch}: not comparable: {'; '.join(differ)}"
        )
    return lines


def compare(a: Path, b: Path, report: Report, left: dict[str, str] | None = None) -> None:
    """`left`: a's snapshot when the caller already took it (hashing every output is the slow part)."""
    left, right = left if left is not None else snapshot(a), snapshot(b)
    excluded = {name for name in left.keys() | right.keys() if exclusion(name)}
    report.compared += 1
    report.hosts = compare_hosts(a, b)
    compare_locks(a, b, excluded, report)
    for name in sorted(left.keys() | right.keys()):
        reason = exclusion(name)
        if name == "dvc.lock":
            continue
        if reason:
            report.excluded.setdefault(reason, []).append(name)
        elif name not in left or name not in right:
            report.fail(f"{name} exists only in clone {'1' if name in left else '2'}")
        else:
            report.compared += 1
            if left[name] != right[name]:
                report.fail(describe_difference(name, a / name, b / name))


RUNNING: set[subprocess.Popen] = set()  # the commands under way, each in its own process group


def stop_everything() -> None:
    """Kill every command still running, with all its children (dvc's stages), and wait for them."""
    for process in list(RUNNING):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        RUNNING.discard(process)


def run(cmd: list[str], cwd: Path, log: Path | None = None) -> str:
    """`cmd` in `cwd`, with `cwd` first on PYTHONPATH: in a clone, the stages and `cifarflow resolve` run
    the clone's code (its commit's), not the installed copy's, which may be another checkout's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    RUNNING.add(process)
    try:
        stdout, stderr = process.communicate()
    finally:
        RUNNING.discard(process)
    done = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    output = done.stdout + done.stderr
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{output}\n")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-FAILURE_LINES:])
        # Exit 2 (bad config or input, e.g. the archive) is ours to report as such; anything else
        # (`dvc repro` exits 255 for any stage failure, git's errors) is a runtime failure, exit 1.
        error = InputError if failure_class(done.returncode) in NOT_RETRYABLE else CifarflowError
        raise error(f"`{' '.join(cmd)}` failed in {cwd} (exit {done.returncode}):\n{tail}")
    return output


def always_changed(workspace: Path) -> set[str]:
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    return {name for name, stage in stages.items() if stage.get("always_changed")}


def stale_entries(workspace: Path, allowed: set[str]) -> dict[str, Any]:
    status = json.loads(run([beside_python("dvc"), "status", "--json"], workspace) or "{}")
    return {stage: entries for stage, entries in status.items() if not (stage in allowed and entries == ["always changed"])}


def stale_resolved_files(workspace: Path) -> list[str]:
    """The stages whose resolved-settings file (what they read of params.yaml, and their code's digest:
    cifarflow.resolved) differs from the one the committed dvc.lock records: what the committed code
    and params give now, written in a scratch folder of the clone, against the lock's md5."""
    stages = yaml.safe_load((workspace / "dvc.lock").read_text()).get("stages") or {}
    scratch = workspace / ".cifarflow" / "resolved-check"
    run([beside_python("cifarflow"), "resolve", "--out", str(scratch)], workspace)
    try:
        problems = []
        for name, stage in sorted(stages.items()):
            for dep in stage.get("deps") or []:
                path = str(dep.get("path", ""))
                if not path.startswith(f"{RESOLVED}/"):
                    continue
                now = scratch / path.removeprefix(f"{RESOLVED}/")
                if not now.is_file() or hash_file(now, "md5") != dep.get("md5"):
                    problems.append(f"dvc.lock is stale for {name}: {path} (its settings or code) changed")
        return problems
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


def committed_lock_problems(workspace: Path) -> list[str]:
    """In a pristine clone no data exists, so outputs show as deleted; a committed lock is stale
    when a tracked code dep, a param, a command or a stage's resolved settings (stale_resolved_files)
    differ from what it records."""
    if not (workspace / "dvc.lock").is_file():
        return []
    tracked = set(run(["git", "ls-files"], workspace).splitlines())
    problems = stale_resolved_files(workspace)
    for stage, entries in stale_entries(workspace, always_changed(workspace)).items():
        for entry in entries:
            if not isinstance(entry, dict):
                if entry != "always changed":
                    problems.append(f"dvc.lock is stale for {stage}: {entry}")
                continue
            for kind, changes in entry.items():
                if kind == "changed params" or kind == "changed command":
                    problems.append(f"dvc.lock is stale for {stage}: {kind} {changes or ''}".rstrip())
                elif kind == "changed deps":
                    code = {p: s for p, s in changes.items() if p in tracked or any(t.startswith(f"{p}/") for t in tracked)}
                    problems += [f"dvc.lock is stale for {stage}: dep {p} {s}" for p, s in code.items()]
    return problems


def select_profile(workspace: Path, source: Path, md5: str, archs: list[str] | None) -> None:
    """The smoke profile on the given archive, as a user would by editing params.yaml."""
    from cifarflow.params_file import set_keys

    changes = {"profile": "smoke", "profiles.smoke.data.source": str(source), "profiles.smoke.data.md5": md5}
    set_keys(workspace / "params.yaml", changes | ({"archs": archs} if archs else {}))


def build_archive(out: Path, real_data: Path | None, real_counts: tuple[int, int]) -> Path:
    archive = out / "cifar-10-binary.tar.gz"
    if real_data is None:
        run([beside_python("cifarflow"), "synth-archive", str(archive), "--train", "2000", "--test", "500"], out)
    else:
        script = real_data / "make_cifar10_binary.py"
        if not script.is_file():
            raise InputError(f"--real-data {real_data}: no make_cifar10_binary.py there (see ../shared/data/README.md)")
        run([sys.executable, str(script), str(archive), "--train", str(real_counts[0]), "--test", str(real_counts[1])], out)
    return archive


def verify(
    repo: Path,
    workdir: Path,
    archs: list[str] | None = None,
    real_data: Path | None = None,
    real_counts: tuple[int, int] = (5000, 1000),
    echo: Any = print,
) -> Report:
    report = Report()
    try:
        repo = Path(run(["git", "rev-parse", "--show-toplevel"], repo).strip())
    except (CifarflowError, OSError) as exc:  # the path given is at fault, not the run: exit 2
        raise InputError(f"{repo}: not a git repository (verify-repro clones its committed HEAD): {exc}") from None
    if run(["git", "status", "--porcelain", "--untracked-files=no"], repo).strip():
        echo("note: uncommitted changes are not part of the check; it clones the committed HEAD")
    archive = build_archive(workdir, real_data, real_counts)
    md5 = hash_file(archive, "md5")
    clones = [workdir / "clone-1", workdir / "clone-2"]
    for clone in clones:
        run(["git", "clone", "--quiet", str(repo), str(clone)], workdir)
    report.problems += committed_lock_problems(clones[0])  # pristine: before the profile is selected
    for clone in clones:
        select_profile(clone, archive, md5, archs)

    def reproduce(number: int, clone: Path) -> None:
        run([beside_python("dvc"), "repro"], clone, workdir / f"clone-{number}.log")
        stale = stale_entries(clone, always_changed(clone))
        if stale:
            report.fail(f"clone {number}: dvc status is not clean after dvc repro: {json.dumps(stale)}")

    # Both at once: each stage is mostly a single-threaded TensorFlow import, so two clones share
    # the cores well; op determinism makes the results independent of the load.
    for number, clone in enumerate(clones, 1):
        echo(f"clone {number}: dvc repro (smoke profile) in {clone}; log {workdir / f'clone-{number}.log'}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            for future in [pool.submit(reproduce, n, c) for n, c in enumerate(clones, 1)]:
                future.result()
        except BaseException:  # stopped, or one clone failed: the other's dvc must not run on (the pool waits for it)
            stop_everything()
            raise
    first, allowed = clones[0], always_changed(clones[0])
    before = snapshot(first)
    echo("clone 1: second dvc repro")
    output = run([beside_python("dvc"), "repro"], first, workdir / "clone-1.log")
    reran = sorted({m.group(1) for line in output.splitlines() if (m := DVC_OUTPUT_LINE.match(line))} - allowed)
    if reran:
        report.fail(f"a second dvc repro ran {', '.join(reran)} again (only {', '.join(sorted(allowed))} may run)")
    after = snapshot(first)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name) and not exclusion(name))
    if changed:
        report.fail(f"a second dvc repro changed {', '.join(changed)}")
    compare(clones[0], clones[1], report, left=after)
    return report


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's cleanup, as Ctrl-C would


def main(repo: Path, archs: list[str] | None, real_data: Path | None, keep: Path | None, real_counts: tuple[int, int]) -> int:
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cifarflow-verify-"))
    workdir.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminated)  # a stopped check leaves no clones behind (~100 MB each)
    try:
        report = verify(repo, workdir, archs, real_data, real_counts)
    finally:
        stop_everything()
        signal.signal(signal.SIGTERM, previous)
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.render())
    return 1 if report.problems else 0
