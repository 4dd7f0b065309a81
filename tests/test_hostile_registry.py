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
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, write_params

from cifarflow import registry
from cifarflow.cli import main
from cifarflow.errors import InputError

MANIFEST = "m" * 64


def fake_export(root: Path, name: str, accuracy: float, blessed: bool = True, kind: str = "archive") -> Path:
    """An export folder as `cifarflow export` writes it, with a few files and a card."""
    export = root / name
    (export / "saved_model" / "variables").mkdir(parents=True)
    (export / "saved_model" / "saved_model.pb").write_bytes(f"graph {name}".encode() * 100)
    (export / "saved_model" / "variables" / "variables.data").write_bytes(os.urandom(2048))
    (export / "labels.txt").write_text("a\nb\n")
    card = {
        "arch": name,
        "blessed": blessed,
        "blessing_reasons": ["ok"],
        "test": {"accuracy": accuracy},
        "weights_sha256": hashlib.sha256(name.encode()).hexdigest(),
        "git_commit": "c0ffee",
        "profile": "full",
        "data_source_kind": kind,
        "data_manifest_sha256": MANIFEST,
    }
    (export / "model_card.json").write_text(json.dumps(card))
    return export


def gate(tolerance: float = 0.01, min_accuracy: float = 0.0) -> registry.Gate:
    return registry.Gate(min_accuracy, tolerance, MANIFEST, lambda v: v.facts["test_accuracy"])


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
    }
    with pytest.raises(registry.PromotionRefused, match="more than export.tolerance"):
        registry.promote(fake_export(tmp_path, "worse", 0.70), reg, gate())
    with pytest.raises(registry.PromotionRefused, match="not blessed"):
        registry.promote(fake_export(tmp_path, "unblessed", 0.99, blessed=False), reg, gate())
    with pytest.raises(registry.PromotionRefused, match="synthetic"):
        registry.promote(fake_export(tmp_path, "synth", 0.99, kind="synth"), reg, gate())
    stale = registry.Gate(0.0, 0.01, "x" * 64, lambda v: v.facts["test_accuracy"])
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
    assert {"seq", "time", "by", "arch", "weights_sha256", "test_accuracy", "blessed", "git_commit"} <= set(
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

PROMOTE = """
import sys
from cifarflow import registry
registry.promote(sys.argv[1], sys.argv[2], registry.Gate(0.0, 1.0, "m" * 64, lambda v: v.facts["test_accuracy"]))
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


def test_sigkill_at_random_times(tmp_path: Path) -> None:
    rng = random.Random(7)
    reg = tmp_path / "reg"
    registry.promote(fake_export(tmp_path, "start", 0.5), reg, gate())
    exports = [fake_export(tmp_path, f"r{i}", 0.5) for i in range(8)]
    for export in exports:
        process = promote_process(export, reg)
        time.sleep(rng.uniform(0.05, 0.6))  # the interpreter start and the promotion itself
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_one_complete_champion(reg, {"start", *(e.name for e in exports)})
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
