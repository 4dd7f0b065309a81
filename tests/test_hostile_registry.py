"""The champion registry under attack: concurrent promoters, SIGKILL at every durability point and at
random times, rollback, garbage collection, forbidden champion_dir values, and readers that must
never see anything but one complete champion. Exports here are small fake folders (no TensorFlow);
the re-score is the recorded accuracy, so these tests are about the registry's mechanics."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli_env, recorded_gate, write_params

from cifarflow import registry
from cifarflow.cli import main
from cifarflow.errors import InputError

MANIFEST = "m" * 64


def fake_export(root: Path, name: str, accuracy: float, kind: str = "archive") -> Path:
    """An export folder as `cifarflow export` writes it, with a few files and a card."""
    export = root / name
    (export / "saved_model" / "variables").mkdir(parents=True)
    (export / "saved_model" / "saved_model.pb").write_bytes(f"graph {name}".encode() * 100)
    (export / "saved_model" / "variables" / "variables.data").write_bytes(os.urandom(2048))
    (export / "labels.txt").write_text("a\nb\n")
    card = {
        "arch": name,
        "test": {"accuracy": accuracy},
        "weights_sha256": hashlib.sha256(name.encode()).hexdigest(),
        "provenance": {"project": {"commit": "c0ffee", "dirty": False}, "snapshot": None},
        "profile": "full",
        "data_source_kind": kind,
        "data_manifest_sha256": MANIFEST,
    }
    (export / "model_card.json").write_text(json.dumps(card))
    return export


def gate(tolerance: float = 0.01, min_accuracy: float = 0.0) -> Any:
    return recorded_gate(tolerance, min_accuracy, MANIFEST)


def assert_one_complete_champion(reg: Path, allowed: set[str] | None = None) -> str | None:
    """What a reader sees: None (nothing promoted yet) or one version whose files are all there."""
    champion = registry.current(reg)
    if champion is None:
        return None
    assert registry.verify(champion) == [], f"{champion.name} is incomplete"
    if allowed is not None:
        assert champion.facts["arch"] in allowed, champion.facts["arch"]
    return champion.facts["arch"]


def test_promote_list_rollback_and_refusals(tmp_path: Path) -> None:
    reg = tmp_path / "champion"
    first = registry.promote(fake_export(tmp_path, "a", 0.80), reg, gate(), by="test")
    assert first["to"].startswith("0001-") and first["verdict"]["champion"] is None
    assert registry.promote(tmp_path / "a", reg, gate())["kind"] == "unchanged"  # already the champion
    second = registry.promote(fake_export(tmp_path, "b", 0.795), reg, gate())  # within tolerance of a
    assert second["verdict"]["champion"] == {
        "version": first["to"],
        "weights_sha256": first["weights_sha256"],
        "test_accuracy": 0.80,
        "mca": None,
    }
    with pytest.raises(registry.PromotionRefused, match="more than export.tolerance"):
        registry.promote(fake_export(tmp_path, "worse", 0.70), reg, gate())
    with pytest.raises(registry.PromotionRefused, match="synthetic"):
        registry.promote(fake_export(tmp_path, "synth", 0.99, kind="synth"), reg, gate())
    stale = recorded_gate(0.01, 0.0, "x" * 64)
    with pytest.raises(registry.PromotionRefused, match="other data"):
        registry.promote(fake_export(tmp_path, "stale", 0.99), reg, stale)
    assert assert_one_complete_champion(reg) == "b"

    back = registry.rollback(reg, by="operator")
    assert (back["from"], back["to"]) == (second["to"], first["to"]) and assert_one_complete_champion(reg) == "a"
    with pytest.raises(registry.PromotionRefused, match="rolled back from"):  # a nightly run must not undo it
        registry.promote(tmp_path / "b", reg, gate())
    forced = registry.promote(tmp_path / "b", reg, gate(), force=True)
    assert forced["verdict"]["forced"] and assert_one_complete_champion(reg) == "b"
    kinds = [(e["kind"], e["to"]) for e in registry.history(reg)]
    assert [k for k, _ in kinds] == ["promote", "promote", "rollback", "promote"]
    assert {"seq", "time", "by", "arch", "weights_sha256", "test_accuracy", "blessed", "provenance"} <= set(
        registry.history(reg)[0]
    )
    listing = registry.render(reg)
    assert "* | 0003-" in listing and "rollback" in listing and "FORCED" in listing and "by operator" in listing


def test_gc_keeps_champion_and_the_one_before(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for i in range(6):
        registry.promote(fake_export(tmp_path, f"m{i}", 0.5 + i / 100), reg, gate())
    registry.rollback(reg, "0002")  # champion 0002; served before it: 0006
    removed = registry.collect_garbage(reg, keep=1)
    # kept: the newest (0006), the champion (0002) and the one served before it; 0006 was rolled
    # back from, so that is 0005
    assert sorted(v.split("-")[0] for v in removed) == ["0001", "0003", "0004"]
    left = [v.name.split("-")[0] for v in registry.versions(reg)]
    assert left == ["0002", "0005", "0006"] and assert_one_complete_champion(reg) == "m1"
    assert registry.history(reg)[-1]["kind"] == "gc"
    with pytest.raises(InputError, match="keep at least 1"):
        registry.collect_garbage(reg, keep=0)


def test_legacy_folder_symlink_and_file_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    (legacy / "saved_model").mkdir(parents=True)
    with pytest.raises(registry.RegistryError, match="older cifarflow"):
        registry.promote(fake_export(tmp_path, "a", 0.8), legacy, gate())
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    for bad in ("link", "file"):
        with pytest.raises(registry.RegistryError, match="symlink or a file"):
            registry.promote(tmp_path / "a", tmp_path / bad, gate())


# --- SIGKILL at every point, and at random times ----------------------------------------------------

PROMOTE = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from conftest import recorded_gate
from cifarflow import registry
registry.promote(sys.argv[1], sys.argv[2], recorded_gate(1.0, 0.0, "m" * 64))
"""


def promote_process(export: Path, reg: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROMOTE, str(export), str(reg)], env={**cli_env(), **env}, stderr=subprocess.PIPE, text=True
    )


def durable_calls_outside_durable() -> list[str]:
    """Filesystem changes in registry.py that do not go through Durable (and so have no kill point)."""
    tree = ast.parse((REPO / "cifarflow" / "registry.py").read_text())
    durable = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Durable")
    inside = {id(n) for n in ast.walk(durable)}
    writers = {
        "replace",
        "rename",
        "write",
        "fsync",
        "unlink",
        "rmtree",
        "copyfile",
        "copy",
        "copytree",
        "mkdir",
        "write_text",
        "write_bytes",
        "makedirs",
        "rmdir",
        "symlink_to",
        "touch",
        "move",
        "write_json_atomic",
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in inside:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
            if name in writers and not (isinstance(receiver, ast.Name) and receiver.id == "io"):
                found.append(f"line {node.lineno}: {name}")
            if name == "open" and any(isinstance(a, ast.Constant) and "w" in str(a.value) for a in node.args[1:]):
                found.append(f"line {node.lineno}: open for writing")
    return found


def test_every_write_of_the_registry_has_a_kill_point() -> None:
    assert durable_calls_outside_durable() == []


def test_sigkill_before_and_after_every_durability_point(tmp_path: Path) -> None:
    base = tmp_path / "base"
    registry.promote(fake_export(tmp_path, "old", 0.5), base, gate())  # the champion a killed promotion must keep
    new = fake_export(tmp_path, "new", 0.6)
    points_file = tmp_path / "points.txt"
    counting = tmp_path / "counting"
    subprocess.run(["cp", "-a", str(base), str(counting)], check=True)
    done = promote_process(new, counting, **{registry.POINTS_ENV: str(points_file)})
    assert done.wait() == 0, done.stderr.read()
    points = points_file.read_text().splitlines()
    labels = [p.split(" ", 1)[1] for p in points]
    # every kind of change is among them, each with a point before and after
    for kind in ("write", "fsync", "rename", "append", "copy", "mkdir"):
        assert any(label.startswith(f"before {kind}") for label in labels), kind
    assert len(points) % 2 == 0 and len(points) >= 30, len(points)
    outcomes = {"old": 0, "new": 0}
    for n in range(1, len(points) + 1):
        reg = tmp_path / f"kill-{n}"
        subprocess.run(["cp", "-a", str(base), str(reg)], check=True)
        process = promote_process(new, reg, **{registry.KILL_ENV: str(n)})
        assert process.wait() == -signal.SIGKILL, f"point {n} ({points[n - 1]}) was not reached"
        seen = assert_one_complete_champion(reg, {"old", "new"})
        outcomes[seen] += 1
        # the next writer repairs what the killed one left, and the history agrees with the pointer
        again = registry.promote(new, reg, gate(tolerance=1.0))
        assert assert_one_complete_champion(reg) == "new"
        events = registry.history(reg)
        assert events[-1]["to"] == registry.pointer(reg)["version"] and [e["seq"] for e in events] == list(
            range(1, len(events) + 1)
        ), (n, points[n - 1], events)
        assert not (reg / registry.INCOMING).exists() and len(registry.versions(reg)) == 2, (n, again)
    assert outcomes["old"] and outcomes["new"], outcomes  # kills fell on both sides of the switch


def points_passed(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_sigkill_at_random_times(tmp_path: Path) -> None:
    """Kills at random instants inside promotions, not only at the durability points themselves: each
    waits until its promotion has passed a random number of points, then SIGKILLs it while it goes on
    (the points file says where it stopped, and that it had not finished). A reader sees one complete
    champion after each, and the next writer repairs what was left."""
    rng = random.Random(7)
    reg = tmp_path / "reg"
    registry.promote(fake_export(tmp_path, "start", 0.5), reg, gate())
    reference = tmp_path / "reference.points"  # one whole promotion, to know its points
    process = promote_process(fake_export(tmp_path, "whole", 0.5), reg, **{registry.POINTS_ENV: str(reference)})
    assert process.wait() == 0, process.stderr.read()
    last = points_passed(reference)[-1].split(" ", 1)[1]  # the history line of the switch, appended
    exports = [fake_export(tmp_path, f"r{i}", 0.5) for i in range(16)]
    stopped, finished = [], []
    for export in exports:
        points = tmp_path / f"{export.name}.points"
        process = promote_process(export, reg, **{registry.POINTS_ENV: str(points)})
        # a kill lands a few points after it is asked for: ask no later than six points before the end
        wanted, deadline = rng.randint(1, len(points_passed(reference)) - 6), time.monotonic() + 60
        while len(points_passed(points)) < wanted and process.poll() is None and time.monotonic() < deadline:
            pass  # busy: the kill should follow the point closely, not a scheduler tick later
        process.send_signal(signal.SIGKILL)
        process.wait()
        passed = points_passed(points)
        assert passed, f"{export.name}: killed before its first point"
        # On a loaded machine the kill may come after the promotion finished: not a sample, draw again.
        (finished if passed[-1].split(" ", 1)[1] == last else stopped).append(passed[-1])
        assert_one_complete_champion(reg, {"start", "whole", *(e.name for e in exports)})
        if len(stopped) == 8:
            break
    assert len(stopped) == 8, f"only {len(stopped)} of {len(stopped) + len(finished)} kills landed inside a promotion"
    assert len({line.split(" ", 1)[1] for line in stopped}) >= 4, stopped  # in several different places
    registry.promote(fake_export(tmp_path, "final", 0.5), reg, gate(tolerance=1.0))
    assert assert_one_complete_champion(reg) == "final"


def test_concurrent_promoters_never_corrupt(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    exports = [fake_export(tmp_path, f"c{i}", 0.5) for i in range(12)]
    names = {e.name for e in exports}
    for round_ in range(3):  # several processes at once, several rounds
        batch = exports[round_ * 4 : (round_ + 1) * 4]
        processes = [promote_process(e, reg) for e in batch]
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            assert_one_complete_champion(reg, names)  # a reader, meanwhile
        for p in processes:
            assert p.wait() == 0, p.stderr.read()
    events = registry.history(reg)
    assert len(events) == 12 and [e["seq"] for e in events] == list(range(1, 13))
    assert len({e["to"] for e in events}) == 12  # no promotion overwrote another's version
    assert registry.pointer(reg)["version"] == events[-1]["to"]
    for v in registry.versions(reg):
        assert registry.verify(v) == []


def test_a_second_promoter_waits_then_fails_clearly(tmp_path: Path) -> None:
    from filelock import FileLock

    reg = tmp_path / "reg"
    reg.mkdir()
    with FileLock(reg / registry.LOCK):
        with pytest.raises(registry.RegistryError, match="another promotion"):
            registry.promote(fake_export(tmp_path, "a", 0.8), reg, gate(), wait_s=0.2)
    assert registry.current(reg) is None


# --- champion_dir: each forbidden place apart, through params --check -------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("data", "inside data/"),
        ("data/champion", "inside data/"),
        ("data/models/lenet/best", "inside data/"),
        ("dvc_out_elsewhere/x", "the DVC output dvc_out_elsewhere"),
        (".", "the project folder itself"),
        ("sub/..", "the project folder itself"),
        ("/", "filesystem root"),
        ("..", "an ancestor of the project"),
        (".git/champion", "inside .git"),
        (".dvc/champion", "inside .dvc"),
        ("link", "is a symlink"),
        ("plainfile", "not a folder"),
        ("", "at least 1 character"),
    ],
)
def test_forbidden_champion_dirs(tmp_path: Path, capsys: pytest.CaptureFixture, value: str, fragment: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages:\n  x:\n    cmd: true\n    outs:\n      - dvc_out_elsewhere\n")
    (project / "elsewhere").mkdir()
    (project / "link").symlink_to(project / "elsewhere")
    (project / "plainfile").write_text("x")
    path = write_params(project, {"export": {"champion_dir": value}})
    assert main(["--params", str(path), "params", "--check"]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("value", ["champion", "registry/champion", "ABS"])
def test_allowed_champion_dirs(tmp_path: Path, capsys: pytest.CaptureFixture, value: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    value = str(tmp_path / "outside" / "champion") if value == "ABS" else value
    path = write_params(project, {"export": {"champion_dir": value}})
    assert main(["--params", str(path), "params", "--check"]) == 0, capsys.readouterr().err


def test_profile_overlay_champion_dir_is_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_params(tmp_path, {"profiles": {"smoke": {"export": {"champion_dir": "data/x"}}}})
    assert main(["--params", str(path), "params", "--check"]) == 2
    assert "profiles.smoke.export.champion_dir" in capsys.readouterr().err


def test_predict_without_champion_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"export": {"champion_dir": "champion"}})
    (tmp_path / "data" / "export" / "saved_model").mkdir(parents=True)  # an export that must NOT be used silently
    (tmp_path / "x.png").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "cifarflow", "--params", str(path), "predict", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "has no champion" in done.stderr and "--model" in done.stderr and "Traceback" not in done.stderr


def test_cli_promote_list_rollback_gc(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_params(tmp_path, {"export": {"champion_dir": "champion", "min_accuracy": 0.1}})
    reg = tmp_path / "champion"
    for name in ("a", "b"):
        registry.promote(fake_export(tmp_path, name, 0.8), reg, gate())
    assert main(["--params", str(path), "promote", "--list"]) == 0
    assert "champion 0002-" in capsys.readouterr().out
    assert main(["--params", str(path), "promote", "--rollback"]) == 0
    assert "0002-" in capsys.readouterr().out and registry.current(reg).facts["arch"] == "a"
    assert main(["--params", str(path), "promote", "--rollback", "0009"]) == 2
    assert "no version '0009'" in capsys.readouterr().err
    assert main(["--params", str(path), "promote", "--gc", "--keep", "1"]) == 0
    assert main(["--params", str(path), "promote", "--champion", str(tmp_path / "data" / "x"), "--list"]) == 2
    assert "inside data/" in capsys.readouterr().err


def test_a_second_rollback_goes_further_back_not_forward(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for name in ("v1", "v2", "v3"):
        registry.promote(fake_export(tmp_path, name, 0.8), reg, gate())
    assert registry.rollback(reg)["to"].startswith("0002")
    assert registry.rollback(reg)["to"].startswith("0001")  # not back to 0003, which was rolled back from
    with pytest.raises(InputError, match="no version served before"):
        registry.rollback(reg)
    with pytest.raises(registry.PromotionRefused, match="rolled back from"):
        registry.promote(tmp_path / "v2", reg, gate())


def test_a_torn_history_line_does_not_lose_a_rollback(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for name in ("a", "b"):
        registry.promote(fake_export(tmp_path, name, 0.8), reg, gate())
    registry.rollback(reg)
    path = reg / registry.HISTORY
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a power cut in the middle of appending the rollback's line
    assert [e["kind"] for e in registry.history(reg)] == ["promote", "promote"]
    with pytest.raises(registry.PromotionRefused, match="rolled back from"):  # CURRENT still holds the rollback
        registry.promote(tmp_path / "b", reg, gate())
    events = registry.history(reg)  # the writer cut the torn line and recorded the rollback late
    assert [e["kind"] for e in events] == ["promote", "promote", "rollback"] and events[-1]["recorded_late"]
    registry.promote(fake_export(tmp_path, "c", 0.8), reg, gate())
    assert [e["seq"] for e in registry.history(reg)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("target", "content"),
    [
        ("CURRENT", b""),
        ("CURRENT", b"garbage"),
        ("CURRENT", b"\xff\xfe"),
        ("CURRENT", b"[]"),
        ("CURRENT", b'{"version": 5, "event": {}}'),
        ("CURRENT", b'{"version": "0001-aaaaaaaaaaaa"}'),
        ("history.jsonl", b"5\n"),
        ("history.jsonl", b'{"seq": "x"}\n'),
        ("history.jsonl", b"\xff\n"),
    ],
)
def test_damaged_registry_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, target: str, content: bytes
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    path = write_params(project, {"export": {"champion_dir": "champion"}})
    reg = project / "champion"
    registry.promote(fake_export(tmp_path, "a", 0.8), reg, gate())
    (reg / target).write_bytes(content)
    readers = [["predict", str(tmp_path)]] if target == "CURRENT" else []  # predict reads only the pointer
    for args in (["promote", "--list"], ["promote", "--gc"], ["promote", "--rollback"], *readers):
        code = main(["--params", str(path), *args])
        err = capsys.readouterr().err
        assert code in (1, 2) and "damaged" in err, (args, err)


def test_a_damaged_old_version_does_not_block_the_registry(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    for name in ("a", "b", "c"):
        registry.promote(fake_export(tmp_path, name, 0.8), reg, gate())
    old = registry.versions(reg)[0]
    (old.path / registry.VERSION_FILE).write_text("{trunc")
    assert "damaged" in registry.render(reg)
    assert old.name in registry.collect_garbage(reg, keep=1)
    registry.promote(fake_export(tmp_path, "d", 0.8), reg, gate())


@pytest.mark.parametrize("card", [{"arch": "x"}, {"test": None}, {"test": {"accuracy": "0.9"}}, [], "x"])
def test_a_malformed_model_card_is_an_input_error(tmp_path: Path, card: object) -> None:
    export = fake_export(tmp_path, "e", 0.8)
    (export / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="model_card.json"):
        registry.promote(export, tmp_path / "reg", gate())
    (export / "model_card.json").write_bytes(b"\x00not json")
    with pytest.raises(InputError, match="model_card.json"):
        registry.promote(export, tmp_path / "reg", gate())


@pytest.mark.parametrize("accuracy", [float("nan"), float("inf"), -0.5, 1.5])
def test_a_non_finite_accuracy_never_passes_the_gate(tmp_path: Path, accuracy: float) -> None:
    reg = tmp_path / "reg"
    registry.promote(fake_export(tmp_path, "good", 0.9), reg, gate())
    with pytest.raises(registry.PromotionRefused, match="not a number in"):
        registry.promote(fake_export(tmp_path, "bad", accuracy), reg, gate(tolerance=1.0))


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "x", "1e9"])
def test_wait_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture, wait: str) -> None:
    path = write_params(tmp_path, {})
    with pytest.raises(SystemExit) as exited:
        main(["--params", str(path), "promote", "--wait", wait])
    assert exited.value.code == 2 and "--wait" in capsys.readouterr().err


def test_who_promoted_is_one_printable_line(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    registry.promote(fake_export(tmp_path, "a", 0.8), reg, gate(), by="evil\n  9999 forged line" + "x" * 500)
    assert "\n  9999" not in registry.render(reg) and len(registry.history(reg)[0]["by"]) == 200


# --- the registry deletes only what it made, and only when it is sure ------------------------------


def promoted(tmp_path: Path, count: int) -> Path:
    reg = tmp_path / "reg"
    for i in range(count):
        registry.promote(fake_export(tmp_path, f"v{i}", 0.8), reg, gate())
    return reg


@pytest.mark.parametrize("damage", ["moved", "emptied", "archived by hand", "truncated"])
def test_a_lost_history_is_an_error_naming_it_and_nothing_is_deleted(tmp_path: Path, damage: str) -> None:
    """Before, the next writer took every version its history did not name for an orphan of a killed
    writer and deleted it (a routine --gc printed "removed 0" and the old versions were gone)."""
    reg = promoted(tmp_path, 3)
    before = sorted(p.name for p in (reg / registry.VERSIONS).iterdir())
    path = reg / registry.HISTORY
    lines = path.read_text().splitlines(keepends=True)
    if damage == "moved":
        path.rename(tmp_path / "elsewhere.jsonl")
    elif damage == "emptied":
        path.write_text("")
    elif damage == "archived by hand":
        path.rename(reg / "history-old.jsonl.gz")
    else:
        path.write_text(lines[0])
    for attempt in (
        lambda: registry.collect_garbage(reg, 1),
        lambda: registry.rollback(reg, "0001"),
        lambda: registry.promote(fake_export(tmp_path, "new", 0.9), reg, gate()),
    ):
        with pytest.raises(registry.RegistryError, match=rf"{re.escape(str(path))}: .*--repair"):
            attempt()
        assert sorted(p.name for p in (reg / registry.VERSIONS).iterdir()) == before
    if damage == "archived by hand":
        (reg / "history-old.jsonl.gz").rename(tmp_path / "history-old.jsonl.gz")  # a file the registry did not make
    done = registry.repair(reg, by="operator")
    assert sorted(p.name for p in (reg / registry.VERSIONS).iterdir()) == before  # deleted nothing
    assert registry.current(reg).name == before[-1] and done["champion"] == before[-1]
    assert {e["to"] for e in registry.history(reg) if e.get("to")} == set(before)
    registry.collect_garbage(reg, 1)  # a working registry again
    assert registry.current(reg).name == before[-1]


def test_only_the_version_a_killed_promoter_staged_is_removed(tmp_path: Path) -> None:
    """A version nothing records is kept and listed as unrecorded; the one PENDING names (written before
    it was staged) is removed once the history shows it never served."""
    reg = promoted(tmp_path, 1)
    stray = reg / registry.VERSIONS / "0007-0123456789ab"  # copied in by hand, say from a backup
    shutil.copytree(next((reg / registry.VERSIONS).iterdir()), stray)
    (reg / registry.VERSIONS / "README.txt").write_text("someone's notes")
    staged = reg / registry.VERSIONS / "0002-aaaaaaaaaaaa"
    shutil.copytree(next((reg / registry.VERSIONS).iterdir()), staged)
    (reg / registry.PENDING).write_text(json.dumps({"version": staged.name, "pid": 1, "host": "h"}))
    registry.collect_garbage(reg, 1)
    assert not staged.exists() and stray.is_dir() and (reg / registry.VERSIONS / "README.txt").is_file()
    listing = registry.render(reg)
    assert f"unrecorded (no history line names them; kept, never removed): {stray.name}" in listing
    assert "foreign entries in versions/ (not the registry's; kept): README.txt" in listing
    registry.collect_garbage(reg, 1)
    assert stray.is_dir()  # --gc never removes what the history does not record


def test_a_folder_that_is_not_a_registry_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "versions" / "holiday").mkdir(parents=True)
    (folder / "versions" / "holiday" / "beach.jpg").write_bytes(b"jpeg")
    (folder / "notes.txt").write_text("x")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    for attempt in (
        lambda: registry.promote(fake_export(tmp_path, "a", 0.8), folder, gate()),
        lambda: registry.collect_garbage(folder, 1),
        lambda: registry.repair(folder),
    ):
        with pytest.raises(registry.RegistryError, match=r"holds files the registry did not make \(notes.txt\)"):
            attempt()
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    empty = tmp_path / "new"
    empty.mkdir()
    registry.promote(fake_export(tmp_path, "b", 0.8), empty, gate())
    assert (empty / registry.MARKER).is_file()


def test_a_registry_from_before_the_marker_is_adopted_by_repair(tmp_path: Path) -> None:
    reg = promoted(tmp_path, 2)
    (reg / registry.MARKER).unlink()
    with pytest.raises(registry.RegistryError, match=r"without its REGISTRY file .*--repair"):
        registry.promote(fake_export(tmp_path, "c", 0.8), reg, gate())
    registry.repair(reg)
    assert (reg / registry.MARKER).is_file() and len(registry.versions(reg)) == 2
    registry.promote(tmp_path / "c", reg, gate())


def test_the_size_caps_advice_is_a_command_that_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the cap, the history names `promote --archive-history`, which moves it aside and starts a new
    one carrying what it decided: a rollback still protects, --rollback still knows what served before."""
    reg = promoted(tmp_path, 3)
    names = [v.name for v in registry.versions(reg)]
    registry.rollback(reg)  # from v2 back to v1: v2's weights are revoked
    monkeypatch.setattr(registry, "MAX_HISTORY_BYTES", 100)
    with pytest.raises(registry.RegistryError, match=r"`cifarflow promote --archive-history`"):
        registry.history(reg)
    monkeypatch.setattr(registry, "MAX_HISTORY_BYTES", 64 << 20)
    event = registry.archive_history(reg)
    assert (reg / event["archived_to"]).is_file() and len(registry.history(reg)) == 1
    with pytest.raises(registry.PromotionRefused, match="rolled back from"):
        registry.promote(tmp_path / "v2", reg, gate())
    assert registry.served_before(reg, names[1]) == names[0]
    fourth = registry.promote(fake_export(tmp_path, "v3", 0.8), reg, gate())
    assert fourth["to"].startswith("0004-")  # numbers go on past the archived ones
    registry.collect_garbage(reg, 1)
    assert registry.current(reg).name == fourth["to"]


def test_a_lock_that_is_a_folder_or_a_symlink_is_an_error_naming_it(tmp_path: Path) -> None:
    reg = promoted(tmp_path, 1)
    (reg / registry.LOCK).unlink()
    (reg / registry.LOCK).mkdir()
    with pytest.raises(registry.RegistryError, match=r"\.lock: not a regular file \(a folder or a symlink\)"):
        registry.collect_garbage(reg, 1)
    (reg / registry.LOCK).rmdir()
    (reg / registry.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(registry.RegistryError, match=r"\.lock: not a regular file"):
        registry.collect_garbage(reg, 1)
