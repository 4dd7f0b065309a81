"""What the console shows: the project's own progress and every real problem, nothing else.

Without -v, stderr gets INFO and above from cifarflow and from Prefect's flow and task runs (their
progress), and only WARNING and above from every other library (httpx's request lines, DVC's and
Prefect's internals stay out). With -v everything is shown at DEBUG, with each line's logger.
`cifarflow flow run` also keeps everything, at DEBUG, in a log file (`log_to_file`).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

# Loggers whose INFO lines are progress a person wants: ours, and Prefect's flow and task run loggers
# (where the flow's stages log what their DVC subprocess prints).
PROGRESS_LOGGERS = ("cifarflow", "prefect.flow_runs", "prefect.task_runs")
KEPT_LOG_FILES = 20  # flow-run log files kept in a folder; older ones are deleted


def is_progress(name: str) -> bool:
    return any(name == root or name.startswith(f"{root}.") for root in PROGRESS_LOGGERS)


class ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (logging.INFO if is_progress(record.name) else logging.WARNING)


class ConsoleFormatter(logging.Formatter):
    """Progress as plain sentences (a flow's lines prefixed with the time and their task run), problems
    with their level, and with their source when it is another library; a logged exception by its
    message (Prefect logs a failed task's traceback, then the flow's, then the CLI says it once)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if run and record.name.startswith("prefect."):
            message = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {run}: {message}"
        if record.levelno >= logging.WARNING:
            source = "" if is_progress(record.name) else f" ({record.name})"
            message = f"{record.levelname.lower()}{source}: {message}"
        return message  # no traceback: -v and the flow's log file have them; the CLI prints a bug's own


VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (main() may be called again with another
    stream, as tests do), never to a stream closed since."""

    cifarflow_console = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # logging.StreamHandler reads and sets this attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure(verbose: bool) -> None:
    """The console handler on the root logger, replacing one an earlier call installed (tests call
    `cli.main` many times in one process). Installed before Prefect is imported, so that Prefect keeps
    it instead of its own (prefect.logging.configuration drops its root handler when one exists).

    A record that cannot be written is dropped without a word: logging's default prints the record and
    the exception being handled when it failed, and that exception may quote a URL with its token."""
    logging.raiseExceptions = False
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "cifarflow_console", False)]:
        root.removeHandler(handler)
    handler = StderrHandler()
    if verbose:
        handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
    else:
        handler.addFilter(ConsoleFilter())
        handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)  # the handler's filter decides what shows
    logging.getLogger("cifarflow").setLevel(logging.DEBUG if verbose else logging.INFO)


def log_to_file(folder: Path, name: str) -> Path:
    """Everything (DEBUG, every library) also goes to folder/<name>-<UTC time>.log; the newest
    KEPT_LOG_FILES such files are kept. Returns the file's path, for the console to say where it is."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for old in sorted(folder.glob(f"{name}-*.log"))[:-KEPT_LOG_FILES]:
        old.unlink(missing_ok=True)
    return path
