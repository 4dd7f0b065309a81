"""Hostile-input suite, second round: output that cannot be forged or lost. File names given to
`cifarflow predict` are the attacker's: a newline forges a table row, escape sequences reach the
terminal, a CSV cell runs as a spreadsheet formula, bytes that are not UTF-8 stop all output, and a
full output device gives a traceback. The model is a stand-in (no TensorFlow): the names are the test."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, write_params
from PIL import Image

from cifarflow import cli, predict
from cifarflow.data import cifar_binary as cb

HOSTILE = {
    "newline": "cat\nfake.png  airplane     1.000  forged row.png",
    "ansi": "\x1b[2J\x1b[31mred.png",
    "carriage return": "a\rb.png",
    "bidi override": "evil\u202egnp.png",
    "line separator": "x\u2028y.png",
    "formula =": "=HYPERLINK(1).png",
    "formula +": "+1.png",
    "formula -": "-2.png",
    "formula @": "@SUM(1).png",
}


class FakeServed:
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.tile(np.linspace(1, 0, 10, dtype=np.float32) / 5.5, (len(images), 1))


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in HOSTILE.values():
        Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / name, format="PNG")
    Image.new("RGB", (32, 32)).save(os.fsencode(folder) + b"/\xff\xfe-latin1.png", format="PNG")  # not UTF-8
    monkeypatch.setattr(predict, "load_model", lambda model_dir: (list(cb.CIFAR10_CLASSES), FakeServed()))
    return folder


def classify(photos: Path, fmt: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = predict.run([photos], photos / "model", fmt, 4096 * 4096)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_file_name_cannot_forge_a_row_or_move_the_cursor(photos: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = classify(photos, "table", capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 1 + len(HOSTILE) + 1, lines  # the header, one row per image: none forged
    assert all(line.isprintable() for line in lines), [line for line in lines if not line.isprintable()]
    assert "\\n" in out and "\\x1b[2J" in out and "\\u202e" in out and "\\u2028" in out and "\\r" in out
    assert "\\xff\\xfe-latin1.png" in out  # shown, escaped, not dropped


def test_csv_cells_do_not_run_as_formulas(photos: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names given relative to the current folder, as a user types them: `=HYPERLINK(1).png` would be
    the cell's first characters; it gets an apostrophe, which a spreadsheet shows and does not run."""
    monkeypatch.chdir(photos)
    names = [HOSTILE[kind] for kind in ("formula =", "formula +", "formula -", "formula @")]
    assert predict.run([Path(n) for n in names], photos / "model", "csv", 4096 * 4096) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == [f"'{n}" for n in names]
    starts = ("=", "+", "-", "@", "\t", "\r")
    assert not [cell for row in rows for cell in row.values() if cell.startswith(starts)]
    assert predict.csv_cell("=1+1") == "'=1+1" and predict.csv_cell("a=b") == "a=b"


def test_json_is_strict_and_holds_every_name(photos: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = classify(photos, "json", capsys)
    rows = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert code == 0 and len(rows) == len(HOSTILE) + 1


def test_a_name_that_is_not_utf8_cannot_stop_the_others_under_a_strict_utf8_stdout(photos: Path, tmp_path: Path) -> None:
    """A desktop's UTF-8 locale: stdout refuses what is not UTF-8. Before, one such name raised
    UnicodeEncodeError and no row at all was printed."""
    code = (
        "import sys; from cifarflow import predict, cli; import numpy as np\n"
        "from cifarflow.data import cifar_binary as cb\n"
        "class Fake:\n"
        "    def probabilities(self, images): return np.full((len(images), 10), 0.1, np.float32)\n"
        "predict.load_model = lambda d: (list(cb.CIFAR10_CLASSES), Fake())\n"
        "cli.native_stderr.quiet_tensorflow = lambda: None\n"
        f"sys.exit(cli.main(['--params', {str(write_params(tmp_path, {}))!r}, 'predict', {str(photos)!r}, '--model', 'm']))\n"
    )
    env = cli_env() | {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert len(done.stdout.decode("utf-8").splitlines()) == len(HOSTILE) + 2


def test_a_full_output_device_is_one_error_line_not_a_traceback(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        code = cli.main(["--params", str(write_params(tmp_path, {})), "predict", str(photos), "--model", "m"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot write the output: No space left on device" in err, err
    assert "Traceback" not in err
