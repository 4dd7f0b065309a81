"""Unit tests of cifarflow.registry (the champion registry), in process, on small fake exports."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import recorded_gate

from cifarflow import registry as r
from cifarflow.errors import InputError

MANIFEST = "m" * 64


def export(root: Path, name: str, accuracy: float = 0.8, **card: object) -> Path:
    folder = root / name
    (folder / "saved_model" / "variables").mkdir(parents=True)
    (folder / "saved_model" / "saved_model.pb").write_bytes(name.encode() * 10)
    (folder / "labels.txt").write_text("a\nb\n")
    base = {
        "arch": name,
        "test": {"accuracy": accuracy},
        "weights_sha256": hashlib.sha256(name.encode()).hexdigest(),
        "provenance": {"project": {"commit": "c0ffee1234567", "dirty": False}, "snapshot": None},
        "profile": "full",
        "data_source_kind": "archive",
        "data_manifest_sha256": MANIFEST,
    }
    (folder / "model_card.json").write_text(json.dumps({**base, **card}))
    return folder


def gate(tolerance: float = 0.01, min_accuracy: float = 0.0, manifest: str = MANIFEST) -> Any:
    return recorded_gate(tolerance, min_accuracy, manifest)


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "champion"


def test_promotion_records_the_version_event_and_pointer(tmp_path: Path, reg: Path) -> None:
    event = r.promote(export(tmp_path, "a", 0.8), reg, gate(), by="alice")
    digest = hashlib.sha256(b"a").hexdigest()
    assert event["to"] == f"0001-{digest[:12]}" and event["seq"] == 1 and event["kind"] == "promote" and event["from"] is None
    assert event["by"] == "alice" and event["arch"] == "a" and event["test_accuracy"] == 0.8 and event["blessed"] is True
    assert event["verdict"]["blessed"] is True and event["verdict"]["champion"] is None and event["verdict"]["forced"] is False
    assert [c["rule"] for c in event["verdict"]["checks"]] == [
        "a_number",
        "min_accuracy",
        "vs_champion",
        "real_data",
    ]  # same_data and not_rolled_back only appear failed; no robustness gate is set
    assert event["provenance"]["project"]["commit"] == "c0ffee1234567" and event["data_source_kind"] == "archive"
    assert event["weights_sha256"] == digest
    champion = r.current(reg)
    assert champion.name == event["to"] and champion.number == 1 and champion.digest == digest
    assert champion.facts["files"].keys() == {"labels.txt", "model_card.json", "saved_model/saved_model.pb"}
    assert champion.facts["files"]["labels.txt"] == hashlib.sha256(b"a\nb\n").hexdigest()
    assert champion.facts["profile"] == "full" and champion.facts["data_manifest_sha256"] == MANIFEST
    assert r.verify(champion) == []
    assert r.pointer(reg) == {"version": event["to"], "event": event}
    assert r.history(reg) == [event]
    assert (reg / r.CURRENT).read_text().endswith("}\n") and (reg / r.HISTORY).read_text().count("\n") == 1
    assert not (reg / r.INCOMING).exists()
    second = r.promote(export(tmp_path, "b", 0.795), reg, gate())
    assert second["to"].startswith("0002-") and second["seq"] == 2 and second["from"] == event["to"]
    assert second["verdict"]["champion"] == {"version": event["to"], "weights_sha256": digest, "test_accuracy": 0.8, "mca": None}
    assert [v.name for v in r.versions(reg)] == [event["to"], second["to"]]


def test_promoting_the_champion_again_changes_nothing(tmp_path: Path, reg: Path) -> None:
    first = r.promote(export(tmp_path, "a"), reg, gate())
    again = r.promote(tmp_path / "a", reg, gate())
    assert again == {"kind": "unchanged", "to": first["to"], "reason": f"{tmp_path / 'a'} is already the champion"}
    assert len(r.history(reg)) == 1


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        (
            {"data_source_kind": "synth", "profile": "smoke"},
            "trained and tested on synthetic data (data.source synth:...): never promotable without --force",
        ),
        (
            {"data_manifest_sha256": "z" * 64},
            "its test accuracy was measured on other data than the shards there are now (rerun the pipeline)",
        ),
        ({"test": {"accuracy": 1.5}}, "test accuracy 1.5 is not a number in [0, 1]"),
        ({"test": {"accuracy": -0.1}}, "test accuracy -0.1 is not a number in [0, 1]"),
    ],
)
def test_every_refusal_reason_is_named(tmp_path: Path, reg: Path, card: dict, reason: str) -> None:
    with pytest.raises(r.PromotionRefused) as caught:
        r.promote(export(tmp_path, "a", **card), reg, gate())
    assert str(caught.value) == f"not promoting {tmp_path / 'a'} (a): {reason} (cifarflow promote --force overrides)"
    assert r.current(reg) is None


def test_the_gate_thresholds_are_inclusive(tmp_path: Path, reg: Path) -> None:
    r.promote(export(tmp_path, "a", 0.5), reg, gate(min_accuracy=0.5))
    with pytest.raises(r.PromotionRefused, match=r"test accuracy 0.4900 < export.min_accuracy 0.5"):
        r.promote(export(tmp_path, "low", 0.49), reg, gate(min_accuracy=0.5))
    r.promote(export(tmp_path, "b", 0.25), reg, gate(tolerance=0.25))  # exactly the tolerance below the champion
    name = r.current(reg).name
    with pytest.raises(
        r.PromotionRefused,
        match=rf"test accuracy 0.1000 is more than export.tolerance 0.1 below the "
        rf"champion {name}'s 0.2500 \(re-scored on this test split\)",
    ):
        r.promote(export(tmp_path, "c", 0.1), reg, gate(tolerance=0.1))


def test_forcing_records_the_overridden_reasons(tmp_path: Path, reg: Path) -> None:
    event = r.promote(export(tmp_path, "a", data_source_kind="synth"), reg, gate(), force=True)
    failed = [c["reason"] for c in event["verdict"]["checks"] if not c["passed"]]
    assert event["verdict"]["forced"] is True and event["blessed"] is False and len(failed) == 1 and "synthetic" in failed[0]
    clean = r.promote(export(tmp_path, "b"), reg, gate(), force=True)
    assert clean["verdict"]["forced"] is False


def test_bad_cards_are_input_errors(tmp_path: Path, reg: Path) -> None:
    with pytest.raises(InputError, match=r"model_card.json: not found; run the export stage first$"):
        r.promote(tmp_path, reg, gate())
    (tmp_path / "model_card.json").write_text("[1]")
    with pytest.raises(InputError, match=r"model_card.json: holds a list, not a JSON object; rerun the export stage$"):
        r.promote(tmp_path, reg, gate())
    for card in ({"weights_sha256": "A" * 64}, {"weights_sha256": "a" * 63}):
        folder = export(tmp_path / str(len(list(tmp_path.iterdir()))), "x", **card)
        with pytest.raises(InputError, match=r"no weights_sha256; export again with this version of cifarflow$"):
            r.promote(folder, reg, gate())
    folder = export(tmp_path / str(len(list(tmp_path.iterdir()))), "x", test=0.9)
    with pytest.raises(InputError, match=r"the model card lacks arch, test.accuracy, data_source_kind"):
        r.promote(folder, reg, gate())
    for accuracy in (True, "0.9"):
        folder = export(tmp_path / str(len(list(tmp_path.iterdir()))), "x", test={"accuracy": accuracy})
        with pytest.raises(r.PromotionRefused, match=rf"test accuracy {accuracy} is not a number in \[0, 1\]"):
            r.promote(folder, reg, gate())
    assert r.promote(export(tmp_path, "int", 1), reg, gate())["test_accuracy"] == 1


def test_rollback_returns_to_the_previous_version_and_revokes_the_weights(tmp_path: Path, reg: Path) -> None:
    with pytest.raises(InputError, match=r"no champion to roll back from; nothing was ever promoted$"):
        r.rollback(reg)
    a = r.promote(export(tmp_path, "a"), reg, gate())
    with pytest.raises(InputError, match=rf"no version served before {a['to']} \(other than ones rolled back from\); name one"):
        r.rollback(reg)
    b = r.promote(export(tmp_path, "b"), reg, gate())
    back = r.rollback(reg, by="bob")
    assert back["kind"] == "rollback" and back["to"] == a["to"] and back["from"] == b["to"] and back["by"] == "bob"
    assert (
        back["from_weights_sha256"] == b["weights_sha256"] and back["weights_sha256"] == a["weights_sha256"] and back["seq"] == 3
    )
    assert back["arch"] == "a" and back["test_accuracy"] == 0.8
    assert r.current(reg).name == a["to"]
    assert r.rolled_back(reg) == {b["weights_sha256"]: back}
    with pytest.raises(r.PromotionRefused, match=rf"these weights were rolled back from version {b['to']} at {back['time']}"):
        r.promote(tmp_path / "b", reg, gate())
    again = r.promote(tmp_path / "b", reg, gate(), force=True)
    assert r.rolled_back(reg) == {} and again["to"].startswith("0003-")
    with pytest.raises(InputError, match=rf"{again['to']} is already the champion$"):
        r.rollback(reg, to="3")
    assert r.rollback(reg, to="001")["to"] == a["to"]
    assert r.rollback(reg, to=b["to"])["to"] == b["to"]
    assert set(r.rolled_back(reg)) == {a["weights_sha256"]}  # b's weights, rolled back to, serve again: not revoked
    with pytest.raises(InputError, match=rf"no version '9'; versions: {a['to']}, {b['to']}, {again['to']}$"):
        r.rollback(reg, to="9")


def test_rollback_records_the_targets_facts_and_waits_only_wait_s(tmp_path: Path, reg: Path) -> None:
    from filelock import FileLock

    provenance = {"project": {"commit": "a1b2c3d4e5f6a", "dirty": True}, "snapshot": {"commit": "5nap", "dirty": False}}
    a = r.promote(export(tmp_path, "a", provenance=provenance, data_source_kind="image-folder"), reg, gate())
    r.promote(export(tmp_path, "b"), reg, gate())
    holder = FileLock(reg / r.LOCK)
    holder.acquire()
    try:  # another promotion holds the registry: the rollback gives up after wait_s, not the default
        with pytest.raises(r.RegistryError, match="held the registry for over 0 s"):
            r.rollback(reg, wait_s=0.1)
    finally:
        holder.release()
    back = r.rollback(reg)
    assert back["to"] == a["to"] and r.history(reg)[-1] == back
    assert (back["blessed"], back["provenance"], back["data_source_kind"]) == (True, provenance, "image-folder")


def test_served_before_skips_versions_rolled_back_from(tmp_path: Path, reg: Path) -> None:
    a = r.promote(export(tmp_path, "a"), reg, gate())
    b = r.promote(export(tmp_path, "b"), reg, gate())
    assert r.served_before(reg, b["to"]) == a["to"]
    r.rollback(reg)  # b -> a: b is revoked
    c = r.promote(export(tmp_path, "c"), reg, gate())
    assert r.served_before(reg, c["to"]) == a["to"]
    r.rollback(reg, to=b["to"])  # b reinstated by a rollback to it
    assert r.served_before(reg, b["to"]) == a["to"]  # c was rolled back from
    assert r.served_before(reg, "none") == b["to"]


def test_a_damaged_target_cannot_be_rolled_back_to(tmp_path: Path, reg: Path) -> None:
    a = r.promote(export(tmp_path, "a"), reg, gate())
    r.promote(export(tmp_path, "b"), reg, gate())
    (reg / r.VERSIONS / a["to"] / "labels.txt").write_text("changed")
    (reg / r.VERSIONS / a["to"] / "saved_model" / "saved_model.pb").unlink()
    with pytest.raises(
        r.RegistryError,
        match=r"damaged \(labels.txt: sha256 differs; saved_model/saved_model.pb: missing\); choose another version$",
    ):
        r.rollback(reg)


def test_gc_keeps_the_newest_the_champion_and_the_one_before(tmp_path: Path, reg: Path) -> None:
    with pytest.raises(InputError, match=r"^--keep 0: keep at least 1 version$"):
        r.collect_garbage(reg, 0)
    assert r.collect_garbage(reg, 1) == []
    names = [r.promote(export(tmp_path, n), reg, gate())["to"] for n in "abcde"]
    r.rollback(reg, to=names[1])  # champion b; e is rolled back from, so d served before b
    assert r.collect_garbage(reg, 1) == [names[0], names[2]]
    assert [v.name for v in r.versions(reg)] == [names[1], names[3], names[4]]
    gc = r.history(reg)[-1]
    assert gc["kind"] == "gc" and gc["removed"] == [names[0], names[2]] and gc["keep"] == 1 and gc["seq"] == 7
    assert not (reg / r.TRASH).exists()
    assert r.collect_garbage(reg, 3) == []
    assert len(r.history(reg)) == 7


def test_history_ignores_a_torn_last_line_and_refuses_damage(reg: Path) -> None:
    assert r.history(reg) == []
    reg.mkdir()
    event = {"seq": 1, "kind": "promote", "to": "0001-aaaaaaaaaaaa"}
    (reg / r.HISTORY).write_text(json.dumps(event) + "\n" + '{"seq": 2, "ki')
    assert r.history(reg) == [event]
    (reg / r.HISTORY).write_text(json.dumps(event) + "\n" + json.dumps({"seq": 2, "kind": "other"}) + "\n")
    with pytest.raises(r.RegistryError, match=r"history.jsonl: line 2 is not an event; the history is damaged"):
        r.history(reg)
    (reg / r.HISTORY).write_text("nope\n")
    with pytest.raises(r.RegistryError, match=r"line 1 is not an event"):
        r.history(reg)
    (reg / r.HISTORY).write_text(json.dumps({"seq": "1", "kind": "gc"}) + "\n")
    with pytest.raises(r.RegistryError, match=r"line 1 is not an event"):
        r.history(reg)
    (reg / r.HISTORY).unlink()
    (reg / r.HISTORY).mkdir()
    with pytest.raises(r.RegistryError, match=r"history.jsonl: not a regular file; the history is damaged$"):
        r.history(reg)


def test_append_cuts_a_torn_line_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "h"
    io = r.Durable()
    io.append(path, "one\n")
    path.write_bytes(path.read_bytes() + b"torn")
    io.append(path, "two\n")
    assert path.read_text() == "one\ntwo\n"
    path.write_bytes(b"x" * 70000)  # a torn line longer than the tail read, no newline at all
    io.append(path, "three\n")
    assert path.read_text() == "three\n"
    path.write_bytes(b"a\n" + b"y" * 70)
    io.append(path, "four\n")
    assert path.read_bytes() == b"a\nfour\n"


def test_append_keeps_complete_lines_before_a_long_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_bytes(b'{"seq": 1}\n' + b"y" * 70000)  # a torn line longer than one read block
    r.Durable().append(path, "two\n")
    assert path.read_bytes() == b'{"seq": 1}\ntwo\n'
    path.write_bytes(b"z" * 70000)  # no complete line at all
    r.Durable().append(path, "one\n")
    assert path.read_bytes() == b"one\n"


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 16])
def test_complete_lines_size_at_every_block_size(tmp_path: Path, block: int) -> None:
    path = tmp_path / "h"
    for content, expected in ((b"a\nbb\nccc", 5), (b"a\nbb\n", 5), (b"abc", 0), (b"\n", 1)):
        path.write_bytes(content)
        assert r.complete_lines_size(path, len(content), block) == expected, (content, block)


def test_durability_points_are_numbered_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    points = tmp_path / "points"
    monkeypatch.setenv(r.POINTS_ENV, str(points))
    monkeypatch.setenv(r.KILL_ENV, "x")
    io = r.Durable()
    assert io.kill_at == 0
    io.write(tmp_path / "f", b"data")
    io.rename(tmp_path / "f", tmp_path / "g")
    io.remove_file(tmp_path / "g")
    assert points.read_text().splitlines() == [
        "1 before write f",
        "2 after write f",
        "3 before fsync f",
        "4 after fsync f",
        "5 before rename f -> g",
        "6 after rename f -> g",
        f"7 before fsync {tmp_path.name}",
        f"8 after fsync {tmp_path.name}",
        "9 before remove g",
        "10 after remove g",
    ]
    monkeypatch.setenv(r.KILL_ENV, "12")
    assert r.Durable().kill_at == 12
    with pytest.raises(FileExistsError):
        io.write(tmp_path / "h", b"") or io.write(tmp_path / "h", b"")


def test_readers_refuse_damaged_pointers_and_versions(reg: Path, tmp_path: Path) -> None:
    assert r.current(reg) is None and r.pointer(reg) is None and r.versions(reg) == []
    reg.mkdir()
    (reg / r.CURRENT).write_text(json.dumps({"version": "0001-aaaaaaaaaaaa", "event": {"seq": 1, "kind": "promote"}}))
    with pytest.raises(r.RegistryError, match=r"versions/0001-aaaaaaaaaaaa: version folder missing, a symlink, or incomplete"):
        r.current(reg)
    for bad in (
        {"version": 1, "event": {"seq": 1, "kind": "promote"}},
        {"version": "v", "event": []},
        {"version": "v", "event": {"seq": 1, "kind": "nope"}},
    ):
        (reg / r.CURRENT).write_text(json.dumps(bad))
        with pytest.raises(
            r.RegistryError, match=r"CURRENT: not a champion pointer \(version and event\); the registry is damaged"
        ):
            r.pointer(reg)
    (reg / r.CURRENT).write_text(json.dumps({"version": "../x", "event": {"seq": 1, "kind": "gc"}}))
    with pytest.raises(r.RegistryError, match=r"CURRENT: names '../x', not a version \(<number>-<12 hex digits>\)$"):
        r.current(reg)
    (reg / r.CURRENT).write_text("x" * (r.MAX_POINTER_BYTES + 1))
    with pytest.raises(r.RegistryError, match=rf"CURRENT: larger than {r.MAX_POINTER_BYTES} bytes; not a registry file$"):
        r.pointer(reg)
    (reg / r.CURRENT).write_text("{")
    with pytest.raises(
        r.RegistryError, match=r"CURRENT: unreadable \(JSONDecodeError\); the registry is damaged: restore the file"
    ):
        r.pointer(reg)
    (reg / r.CURRENT).write_text("[]")
    with pytest.raises(r.RegistryError, match=r"CURRENT: holds a list, not a dict; the registry is damaged$"):
        r.pointer(reg)
    (reg / r.CURRENT).unlink()
    (reg / r.CURRENT).mkdir()
    with pytest.raises(r.RegistryError, match=r"CURRENT: not a regular file; the registry is damaged$"):
        r.pointer(reg)


def test_damaged_versions_are_listed_as_such(tmp_path: Path, reg: Path) -> None:
    a = r.promote(export(tmp_path, "a"), reg, gate())
    b = r.promote(export(tmp_path, "b"), reg, gate())
    (reg / r.VERSIONS / "junk").mkdir()
    (reg / r.VERSIONS / a["to"] / r.VERSION_FILE).write_text(json.dumps({"weights_sha256": "x"}))
    listed = r.versions(reg)
    assert [v.name for v in listed] == [a["to"], b["to"]]
    assert "lacks weights_sha256 or files; the version is damaged" in listed[0].facts["damaged"]
    assert r.verify(listed[0]) == [listed[0].facts["damaged"]]
    numbers = [f"{n}-{'a' * 12}" for n in (10000, 9999)]
    for name in numbers:
        (reg / r.VERSIONS / name).mkdir()
    assert [v.name for v in r.versions(reg)][-2:] == [numbers[1], numbers[0]]  # by number, not by text


def test_recover_finishes_a_killed_writers_work(tmp_path: Path, reg: Path) -> None:
    a = r.promote(export(tmp_path, "a"), reg, gate())
    (reg / r.INCOMING / "x").mkdir(parents=True)
    (reg / r.TRASH).mkdir()
    (reg / f"{r.CURRENT}.123.tmp").write_text("half")
    orphan = reg / r.VERSIONS / f"0009-{'b' * 12}"  # staged by a promoter killed before it recorded it
    orphan.mkdir()
    (reg / r.PENDING).write_text(json.dumps({"version": orphan.name, "pid": 1, "host": "h"}))
    stray = reg / r.VERSIONS / f"0010-{'c' * 12}"  # nothing says who made it: kept
    stray.mkdir()
    late = {**a, "seq": 2, "kind": "promote"}
    (reg / r.CURRENT).write_text(json.dumps({"version": a["to"], "event": late}))
    assert r._events(reg)[-1] == late
    with r.locked(reg):
        pass
    assert not (reg / r.INCOMING).exists() and not (reg / r.TRASH).exists() and not orphan.exists()
    assert stray.is_dir() and not (reg / r.PENDING).exists()
    assert not list(reg.glob("*.tmp"))
    assert r.history(reg)[-1] == {**late, "recorded_late": True}
    assert "[recorded late]" in r.render(reg)


def test_layout_checks_refuse_files_links_and_legacy_copies(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(r.RegistryError, match=r"file: is a symlink or a file; the registry must be a real folder$"):
        r.check_layout(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(r.RegistryError, match=r"link: is a symlink or a file"):
        r.check_layout(tmp_path / "link")
    (tmp_path / "old" / "saved_model").mkdir(parents=True)
    with pytest.raises(r.RegistryError, match=r"old: holds a champion copied by an older cifarflow \(saved_model/ at the top\)"):
        r.check_layout(tmp_path / "old")
    r.check_layout(tmp_path / "new")


def test_a_busy_registry_times_out_naming_the_lock(reg: Path) -> None:
    from filelock import FileLock

    reg.mkdir()
    holder = FileLock(reg / r.LOCK)
    holder.acquire()
    try:
        with pytest.raises(r.RegistryError, match=r"\.lock: another promotion has held the registry for over 0 s; wait for it"):
            with r.locked(reg, wait_s=0.05):
                pass
    finally:
        holder.release()


def test_exports_hold_only_files_and_folders(tmp_path: Path, reg: Path) -> None:
    folder = export(tmp_path, "a")
    (folder / "link").symlink_to(folder / "labels.txt")
    with pytest.raises(InputError, match=r"link: not a regular file or folder; an export holds only files and folders$"):
        r.promote(folder, reg, gate())


def test_cached_score_scores_once_per_weights_and_data(tmp_path: Path, reg: Path) -> None:
    r.promote(export(tmp_path, "a", 0.8), reg, gate())
    champion = r.current(reg)
    calls = []

    def score(v: r.Version) -> float:
        calls.append(v.name)
        return 0.75

    assert r.cached_score(reg, champion, MANIFEST, score) == 0.75
    assert r.cached_score(reg, champion, MANIFEST, score) == 0.75 and len(calls) == 1
    path = reg / r.SCORES / f"{champion.digest[:16]}-{MANIFEST[:16]}.json"
    assert json.loads(path.read_text()) == {
        "test_accuracy": 0.75,
        "weights_sha256": champion.digest,
        "data_manifest_sha256": MANIFEST,
    }
    assert r.cached_score(reg, champion, "n" * 64, score) == 0.75 and len(calls) == 2
    path.write_text('{"other": 1}')
    assert r.cached_score(reg, champion, MANIFEST, score) == 0.75 and len(calls) == 3
    assert not list((reg / r.SCORES).glob(".*"))


def test_by_is_one_printable_bounded_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert r._by("a\nb\tc") == "a b c"
    assert r._by("x" * 300) == "x" * 200
    monkeypatch.setenv("CIFARFLOW_PROMOTED_BY", "ci-bot")
    assert r._by() == "ci-bot"
    monkeypatch.delenv("CIFARFLOW_PROMOTED_BY")
    assert f"pid {os.getpid()}" in r._by() and "@" in r._by()


def test_render_lists_versions_and_history(tmp_path: Path, reg: Path) -> None:
    assert r.render(reg).startswith(f"registry {reg}: no version yet.")
    a = r.promote(export(tmp_path, "a", 0.8), reg, gate(), by="al")
    b = r.promote(export(tmp_path, "b", 0.9, data_source_kind="synth"), reg, gate(), force=True, by="bo")
    lines = r.render(reg).splitlines()
    assert f"|  | {a['to']} | a | 0.8 | True | archive | project c0ffee123456 |" in lines
    assert f"| * | {b['to']} | b | 0.9 | False | synth | project c0ffee123456 |" in lines
    r.promote(export(tmp_path, "c", 0.95), reg, gate())
    r.collect_garbage(reg, 1)
    text = r.render(reg)
    lines = text.splitlines()
    assert lines[0] == f"registry {reg}: champion {r.current(reg).name}"
    assert any(line.startswith("| * | 0003-") and "| c | 0.95 |" in line for line in lines)
    assert f"     1 {a['time']} promote: (none) -> {a['to']} (a, test 0.8) by al" in lines
    assert f"     2 {b['time']} promote FORCED: {a['to']} -> {b['to']} (b, test 0.9) by bo" in lines
    assert any(line.endswith(f"gc: removed {a['to']} (keep 1)") and line.startswith("     4 ") for line in lines)
    assert text.endswith("\n") and "history (oldest first):" in lines
