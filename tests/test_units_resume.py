"""The resume store's fallback, without TensorFlow: checkpoints are plain files here."""

from __future__ import annotations

from pathlib import Path

from cifarflow.training.resume import DAMAGED, PREVIOUS, STATE_FILE, ResumeStore, RunState


def epoch(store: ResumeStore, n: int) -> None:
    """Epoch `n` done: its checkpoint written, then committed."""
    (store.root / f"epoch-{n}.keras").write_bytes(f"weights after epoch {n}".encode())
    store.commit(RunState(epoch=n, checkpoint=f"epoch-{n}.keras"))


def damage(store: ResumeStore, n: int) -> None:
    (store.root / f"epoch-{n}.keras").write_bytes(b"flipped")


def test_a_fallback_survives_the_commit_after_it(tmp_path: Path) -> None:
    """Damage, fall back, train on, damage again: the second fallback is the epoch before the newest,
    not a start from scratch (the broken state was once rotated over the good fallback, whose
    checkpoint the commit then deleted)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    store = ResumeStore(root, "f")
    for n in (1, 2):
        epoch(store, n)
    damage(store, 2)
    restarted = ResumeStore(root, "f")
    assert restarted.load().epoch == 1
    assert (root / DAMAGED / "epoch-2.keras").is_file() and (root / DAMAGED / STATE_FILE).is_file()  # kept aside
    for n in (2, 3):  # the run goes on from epoch 1
        epoch(restarted, n)
    assert sorted(p.name for p in root.glob("*.keras")) == ["epoch-2.keras", "epoch-3.keras"]  # older ones removed
    damage(restarted, 3)
    again = ResumeStore(root, "f")
    assert again.load().epoch == 2 and (root / PREVIOUS).is_file()
    assert any("resumed from the state before the last (after epoch 2)" in note for note in again.notes), again.notes


def test_a_state_whose_checkpoints_are_gone_starts_from_scratch(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    store = ResumeStore(root, "f")
    for n in (1, 2):
        epoch(store, n)
    damage(store, 1)
    damage(store, 2)
    fresh = ResumeStore(root, "f")
    assert fresh.load() is None and fresh.notes[-1] == "no intact resume state: started from scratch"
