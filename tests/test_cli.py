"""The CLI as a user meets it: help for every argument, the exit codes its docstring promises, the
offline download failure pointing at the smoke profile, and TensorFlow's CPU-only start-up noise dropped."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, free_port

from cifarflow import cli, errors, native_stderr


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subcommand's parser, by its command line, e.g. {"flow run": ...}."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found |= subcommands(sub, f"{prefix}{name} ")
    return found


def test_every_argument_of_every_command_has_help() -> None:
    parser = cli.build_parser()
    commands = subcommands(parser)
    assert {"train", "evaluate", "predict", "flow run", "synth-archive"} <= set(commands)
    missing = [
        f"{name}: {action.dest}"
        for name, sub in {"": parser, **commands}.items()
        for action in sub._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        ("predict", ["PNG/JPEG files, or folders", "--format {table,json,csv}", "JSON list"]),
        ("train", ["a key of train: in params.yaml", "shards folder"]),
        ("evaluate", ["a key of train: in params.yaml"]),
        ("synth-archive", ["the .tar.gz to write"]),
    ],
)
def test_help_describes_positionals_and_options(command: str, fragments: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fragment in fragments:
        assert fragment in text


def test_module_docstring_states_every_exit_code() -> None:
    """Each error class's exit code (train's out-of-memory 3 among them) is in the cli docstring's list."""
    doc = " ".join(cli.__doc__.split())
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.CifarflowError)}
    assert errors.OutOfMemoryError.exit_code == 3
    for code, meaning in {
        0: "ok",
        1: "anything else",
        2: "bad configuration or input",
        3: "out of memory",
        130: "interrupted",
    }.items():
        assert f"{code} {meaning}" in doc
    assert codes <= {1, 2, 3}


def test_main_returns_the_errors_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    class OutOfMemory(errors.CifarflowError):
        exit_code = 3
        failure_class = "oom"

    def boom(args: argparse.Namespace, params: object) -> int:
        raise OutOfMemory("out of memory")

    monkeypatch.setattr(cli, "cmd_synth_archive", boom)
    assert cli.main(["synth-archive", "x.tgz", "--train", "5", "--test", "1"]) == 3
    assert "error: out of memory" in capsys.readouterr().err


def test_offline_download_failure_names_the_smoke_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`make pipeline` without internet: the download stage's error says how to run offline."""
    url = f"http://127.0.0.1:{free_port()}/cifar-10-binary.tar.gz"  # nothing listens there
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": url, "md5": "0" * 32, "retries": 1, "timeout_s": 2.0}}))
    argv = ["--params", str(params), "download", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert url in err and "data.source" in err and "`make pipeline PROFILE=smoke`" in err
    assert not (tmp_path / "raw").exists()


STARTUP = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 1 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results\n",
]
CUDA_PROBE = [
    b"I0000 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n",
    b"E0000 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
]


REMAPPER = (  # what TF printed while simple_cnn trained with oneDNN on (TF_ENABLE_ONEDNN_OPTS=1 here reproduces it)
    b"E0000 00:00:1796643326.539746 15660 meta_optimizer.cc:967] remapper failed: INVALID_ARGUMENT: Mutation::Apply "
    b"error: fanout 'StatefulPartitionedCall/gradient_tape/simple_cnn_full_1/conv3_leaky_1/LeakyRelu/LeakyReluGrad' "
    b"exist for missing node 'StatefulPartitionedCall/simple_cnn_full_1/conv3_1/BiasAdd'.\n"
)


@pytest.mark.parametrize("gpu", [False, True])
def test_native_stderr_filter_drops_only_matching_lines(capfd: pytest.CaptureFixture, gpu: bool) -> None:
    with native_stderr.filtered(gpu):
        for line in [*STARTUP, *CUDA_PROBE, b"W0000 1 some_op.cc:12] a real warning\n", REMAPPER, REMAPPER]:
            os.write(2, line)
        print("a Python warning", file=sys.stderr)
        os.write(2, b"epoch 1/2 [=====   ]\r")  # a partial line: passed on as it comes, not held back
    err = capfd.readouterr().err  # (under capfd, sys.stderr is pytest's, not file descriptor 2: order may differ)
    kept = ["W0000 1 some_op.cc:12] a real warning", "a Python warning", native_stderr.REMAPPER_NOTE]  # the note once
    if gpu:  # with a driver present the CUDA lines may matter: kept
        kept += [line.decode().rstrip("\n") for line in CUDA_PROBE]
    assert err.endswith("epoch 1/2 [=====   ]\r")
    assert sorted(err.removesuffix("epoch 1/2 [=====   ]\r").splitlines()) == sorted(kept)


def test_native_stderr_filter_passes_lines_on_while_it_runs(capfd: pytest.CaptureFixture) -> None:
    """Live, not replayed at the end: a long training's progress must show as it happens."""
    import time

    with native_stderr.filtered(gpu=False):
        os.write(2, b"first line\n")
        deadline = time.monotonic() + 10
        while "first line" not in capfd.readouterr().err:
            assert time.monotonic() < deadline, "the line did not come through while the filter ran"
            time.sleep(0.05)


def test_a_native_crash_keeps_its_last_words() -> None:
    """A process that dies of a native abort right after writing to fd 2 (as a fatal check does): the
    filter, a process of its own, still passes the message on; and noise is still dropped."""
    code = (
        "import os\n"
        "from cifarflow import native_stderr\n"
        "native_stderr.LiveFilter(gpu=False)\n"
        f"os.write(2, {STARTUP[0]!r})\n"
        "os.write(2, b'F0000 check failed: the last words\\n')\n"
        "os.abort()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.returncode == -signal.SIGABRT
    assert done.stderr == "F0000 check failed: the last words\n"


@pytest.mark.skipif(native_stderr.gpu_expected(), reason="an NVIDIA driver is present: its CUDA messages are kept on purpose")
def test_tensorflow_starts_quietly_on_a_cpu_machine() -> None:
    code = (
        "import sys\n"
        "from cifarflow.native_stderr import quiet_tensorflow\n"
        "quiet_tensorflow()\n"
        "import tensorflow as tf\n"
        "tf.constant([1.0]) + 1\n"
        "tf.get_logger().warning('a real warning')\n"
        "print(tf.config.list_physical_devices('CPU'))\n"
    )
    env = {k: v for k, v in cli_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "CPU:0" in done.stdout and "a real warning" in done.stderr
    for noise in ("cuInit", "Could not find cuda drivers", "absl::InitializeLog", "cpu_feature_guard", "oneDNN"):
        assert noise not in done.stderr, done.stderr
