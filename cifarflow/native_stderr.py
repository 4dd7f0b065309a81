"""TensorFlow's native log lines, as a person should see them: its start-up notices dropped, a known
harmless error explained once in plain words, every other warning and error kept.

Native code writes to file descriptor 2 directly, past Python's logging, so the filter sits on the
descriptor: fd 2 becomes a pipe, and a small filter process (this file run as a script, standard
library only) copies what arrives to the real stderr, line by line, as it arrives (progress stays
live). A process, not a thread: when this one dies of a native crash (a fatal check, an abort, a
signal) its last words are still in the pipe, and the filter, reading to the end, passes them on.
TF_CPP_MIN_LOG_LEVEL=0 turns the filter off: everything shows.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# What TensorFlow's native code prints in every process before absl's logging is initialised, so
# that TF_CPP_MIN_LOG_LEVEL does not reach it: the banner announcing exactly that, and the oneDNN
# notice (an INFO line, on CPUs where oneDNN is on by default, e.g. with AVX-512).
STARTUP_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
)
# What it prints on a machine with no NVIDIA driver: the CUDA runtime stub's probe and cuInit's
# failure (an ERROR line, so a log level that hid it would hide real errors too). Dropped only on
# such machines (see `gpu_expected`).
CPU_ONLY_NOISE = re.compile(
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
)
# An ERROR line TensorFlow prints while training a convolution followed by LeakyReLU (simple_cnn)
# where oneDNN is on (AVX-512 CPUs): its graph optimizer's fusion pass ("remapper") trips over the
# LeakyReLU gradient and is skipped for that graph, which then runs as written. Training is correct.
REMAPPER_SKIPPED = re.compile(r"meta_optimizer\.cc:\d+\] remapper failed: INVALID_ARGUMENT: Mutation::Apply error")
REMAPPER_NOTE = (
    "note: TensorFlow skipped one graph optimization for this model (its 'remapper' cannot fuse a "
    "convolution with the LeakyReLU after it when oneDNN is on; it prints an E0000 meta_optimizer.cc line "
    "for it, shown here once as this note). The model trains unfused: correct, only a little slower."
)
JOIN_S = 5.0  # at exit, for the filter process to pass on what is still in the pipe


@dataclass(frozen=True)
class Rules:
    """Lines to drop, and lines to replace by a note said once per process."""

    drop: re.Pattern[str]
    explain: tuple[tuple[re.Pattern[str], str], ...] = field(default=())


def gpu_expected() -> bool:
    """Whether an NVIDIA driver is present: then TensorFlow's CUDA messages may matter and are kept."""
    import ctypes.util

    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists() or ctypes.util.find_library("cuda") is not None


def tensorflow_rules(gpu: bool) -> Rules:
    """STARTUP_NOTICES dropped, CPU_ONLY_NOISE too when no GPU is expected, the remapper error explained."""
    drop = STARTUP_NOTICES if gpu else re.compile(f"{STARTUP_NOTICES.pattern}|{CPU_ONLY_NOISE.pattern}")
    return Rules(drop, ((REMAPPER_SKIPPED, REMAPPER_NOTE),))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class LineFilter:
    """`rules` applied to each complete line; the explained lines' note said once."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.noted: set[int] = set()

    def kept(self, line: bytes) -> bytes:
        text = line.decode(errors="replace")
        if self.rules.drop.search(text):
            return b""
        for index, (pattern, note) in enumerate(self.rules.explain):
            if pattern.search(text):
                if index in self.noted:
                    return b""
                self.noted.add(index)
                return f"{note}\n".encode()
        return line + b"\n"

    def pump(self, source: int, sink: int) -> None:
        """Copy `source` to `sink` until the end. A partial line (a progress bar's carriage-return
        update) is passed on at once, unfiltered."""
        try:
            while chunk := os.read(source, 1 << 16):
                *lines, partial = chunk.split(b"\n")
                _write_all(sink, b"".join(self.kept(line) for line in lines) + partial)
        except OSError:  # the real stderr is gone (a closed terminal): nothing left to show it to
            pass


class LiveFilter:
    """fd 2 through a pipe into the filter process, whose stdout is the real stderr."""

    def __init__(self, gpu: bool) -> None:
        sys.stderr.flush()
        self.real = os.dup(2)
        read_end, write_end = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-E", __file__, "gpu" if gpu else "cpu"],
            stdin=read_end,
            stdout=self.real,
            stderr=subprocess.DEVNULL,
        )
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)

    def stop(self) -> None:
        """The real stderr back on fd 2; what is still in the pipe is passed on first."""
        sys.stderr.flush()
        os.dup2(self.real, 2)  # closes our last write end: the filter reads to the end and exits
        try:
            self.process.wait(timeout=JOIN_S)
        except subprocess.TimeoutExpired:  # a child of ours still holds the pipe: it passes on the rest
            pass
        os.close(self.real)


@contextmanager
def filtered(gpu: bool) -> Iterator[LiveFilter]:
    """fd 2 through `tensorflow_rules(gpu)` for the duration."""
    live = LiveFilter(gpu)
    try:
        yield live
    finally:
        live.stop()


def quiet_tensorflow() -> None:
    """Import TensorFlow with the filter on fd 2 for the rest of the process (`tensorflow_rules`),
    before any stage code does. TF_CPP_MIN_LOG_LEVEL=1 (unless set) drops the native INFO lines logged
    after start-up (TF_ENABLE_ONEDNN_OPTS is left alone: it changes numerics). TF_CPP_MIN_LOG_LEVEL=0
    keeps everything; no GPU is hidden anywhere."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # inherited by the processes a stage starts
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    atexit.register(LiveFilter(gpu_expected()).stop)
    import tensorflow as tf

    tf.config.list_physical_devices()  # the CUDA platform probes (cuInit) here; the runtime stays unconfigured


def main() -> None:
    """The filter process: stdin through `tensorflow_rules` to stdout until the end. Ctrl-C and a
    stage's timeout signal the whole process group: the filter outlives them to pass on what its
    writer says last, and ends with the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    LineFilter(tensorflow_rules(sys.argv[1] == "gpu")).pump(0, 1)


if __name__ == "__main__":
    main()
