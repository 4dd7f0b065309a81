"""Error classes that decide the CLI's exit code and the failure class a driver reads, and the
reverse: the failure class of a finished command, from its status file or its exit code."""

from __future__ import annotations

from typing import Any

STATUS_ENV = "CIFARFLOW_STATUS_FILE"  # names the JSON file where the CLI writes a failure's class, exit code and message
USAGE_EXIT = 2  # bad configuration or input: not worth retrying
RUNTIME_EXIT = 1


class CifarflowError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = RUNTIME_EXIT
    failure_class = "runtime"


class ConfigError(CifarflowError):
    """params.yaml is invalid (unknown key, bad type, value out of range). Not worth retrying."""

    exit_code = USAGE_EXIT
    failure_class = "config"


class InputError(CifarflowError):
    """An input file or source is bad (checksum, layout, unsafe archive). Not worth retrying."""

    exit_code = USAGE_EXIT
    failure_class = "input"


class OutOfMemoryError(CifarflowError):
    """A training ran out of device memory; the next attempt (a fresh process) uses a smaller micro-batch."""

    exit_code = 3
    failure_class = "oom"


class SourceUnavailableError(CifarflowError):
    """No mirror of data.source could be read; may be transient, so a retry can help."""

    exit_code = RUNTIME_EXIT
    failure_class = "runtime"


NOT_RETRYABLE = (ConfigError.failure_class, InputError.failure_class)


def failure_class(exit_code: int, status: dict[str, Any] | None = None) -> str:
    """The class of a failed command: the one the CLI wrote to its status file (STATUS_ENV) if it did,
    else read from the exit code (USAGE_EXIT: "config"; anything else: "runtime"). `dvc repro` exits
    255 whatever failed, so for a stage only the status file tells."""
    written = (status or {}).get("class")
    if isinstance(written, str) and written:
        return written
    return ConfigError.failure_class if exit_code == USAGE_EXIT else CifarflowError.failure_class
