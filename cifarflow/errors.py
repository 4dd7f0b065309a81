"""Error classes that decide the CLI's exit code and the failure class a driver reads."""

from __future__ import annotations


class CifarflowError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = 1
    failure_class = "runtime"


class ConfigError(CifarflowError):
    """params.yaml is invalid (unknown key, bad type, value out of range). Not worth retrying."""

    exit_code = 2
    failure_class = "config"


class InputError(CifarflowError):
    """An input file or source is bad (checksum, layout, unsafe archive). Not worth retrying."""

    exit_code = 2
    failure_class = "input"


class SourceUnavailableError(CifarflowError):
    """No mirror of data.source could be read; may be transient, so a retry can help."""

    exit_code = 1
    failure_class = "runtime"
