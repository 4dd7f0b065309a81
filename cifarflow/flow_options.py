"""The pipeline flow's run options, defined once: `cifarflow flow run` and `python -m
cifarflow.flows.pipeline` build their parsers here, and `parameters` turns the parsed options into
the flow's parameters. Standard library only, so the CLI's parser stays light."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

WEBHOOK_ENV = "CIFARFLOW_WEBHOOK_URL"
SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")  # Prefect's block names


def secret_name(text: str) -> str:
    """`text` if it can be a Secret block's name; else an ArgumentTypeError that does not show it (a
    URL pasted by mistake must not end up in a log: parameters are stored and shown by Prefect)."""
    if not SECRET_NAME.match(text):
        raise argparse.ArgumentTypeError(
            "must be the NAME of a Secret block (lowercase letters, digits and dashes), not the webhook URL; "
            "the value given is not a block name and is not shown"
        )
    return text


def seconds(most: float, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of seconds, more than 0 (or from 0, with `zero`) up to `most`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
        if not ((0 <= value) if zero else (0 < value)) or not value <= most:  # NaN fails both
            low = "from 0" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {low} up to {most:g} seconds, got {text[:40]!r}")
        return value

    return parse


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--archs", help="comma-separated architectures, for this run only (default: params.yaml archs)")
    parser.add_argument("--profile", help="params profile, e.g. smoke: runs in runs/<profile>/, as make pipeline PROFILE= does")
    parser.add_argument("--workspace", default=".", help="the project folder the flow runs in (default: %(default)s)")
    parser.add_argument(
        "--webhook-secret",
        metavar="NAME",
        type=secret_name,
        help=f"the Prefect Secret block holding the alert webhook URL (Slack-compatible JSON; default: ${WEBHOOK_ENV}, "
        "else no alerts)",
    )
    parser.add_argument("--no-promote", action="store_true", help="do not promote a blessed export")
    parser.add_argument("--stage-timeout", type=seconds(7 * 86_400), metavar="SECONDS", help="kill a stage that runs longer")
    return parser


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters from parsed options."""
    return {
        "archs": args.archs.split(",") if args.archs else None,
        "profile": args.profile,
        "workspace": args.workspace,
        "webhook_secret": args.webhook_secret,
        "promote": not args.no_promote,
        "stage_timeout_s": args.stage_timeout,
    }
