"""The `cifar10-pipeline` flow: download -> preprocess -> validate -> corrupt -> (train, evaluate) per arch
-> export -> report -> promote if blessed, each stage a `dvc repro --single-item` task.

It only orchestrates: order, retries (in tasks/), artifacts, alerts. Stages run one after
another because one workspace has one DVC lock; parallelism across GPU nodes goes through
separate workspaces and a DVC remote. Run it locally on Prefect's ephemeral server with
`python -m flows.pipeline` or `cifarflow flow run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

import requests
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.system import Secret
from prefect.exceptions import MissingContextError, ObjectNotFound

from cifarflow.redact import REDACTED, URL_IN_TEXT, origin, redact_text
from tasks.stages import (
    data_stage,
    evaluate_stage,
    export_stage,
    params_check,
    promote_export,
    report_stage,
    stale_stages,
    train_stage,
)

# The webhook URL carries its token, so it is never a flow parameter (parameters are stored in
# Prefect's database and shown in the UI): the parameter `webhook_secret` names a Secret block
# (stored encrypted) and the URL is read from it, or from this variable, only when an alert is sent.
WEBHOOK_ENV = "CIFARFLOW_WEBHOOK_URL"
# requests quotes the URL, or its path and query, in its messages ("Max retries exceeded with url: /T0/B0/token").
QUOTED_URL = re.compile(r"((?:with|for) url: )\S+")
DATA_STAGES = ("download", "preprocess", "validate", "corrupt")
MODEL_CARD = "model_card.json"  # the file `cifarflow export` writes in its output folder


def stage_outputs(workspace: Path) -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares as its outs, metrics and plots. dvc.yaml is the only place
    stage paths are written: the flow reads them there, parsed once per call."""
    from cifarflow.config import dvc_stage_outputs

    outputs = dvc_stage_outputs(workspace)
    if not outputs:
        raise FileNotFoundError(f"{workspace / 'dvc.yaml'}: missing or has no stages; run the flow in a cifarflow workspace")
    return outputs


def declared(outputs: dict[str, list[str]], stage: str, name: str | None = None) -> str:
    """The output of `stage` whose file name is `name`; with no name, its one output (a folder)."""
    paths = outputs.get(stage, [])
    found = [p for p in paths if name is None or Path(p).name == name]
    if len(found) != 1:
        wanted = f"an output named {name}" if name else "exactly one output"
        raise LookupError(f"dvc.yaml: stage {stage!r} declares {paths or 'no outputs'}; the flow needs {wanted}")
    return found[0]


def select(workspace: Path, archs: list[str] | None, profile: str | None) -> list[str]:
    """Apply the flow's selection to params.yaml, as `dvc exp run -S` would, so that a plain
    `dvc repro` afterwards agrees with what ran; return the architectures to run. The file keeps
    its comments and layout (round-trip edit), and is validated (bounded) before anything else."""
    from cifarflow.config import read_yaml, resolve
    from cifarflow.params_file import set_keys

    path = workspace / "params.yaml"
    changes: dict[str, Any] = {}
    if profile is not None:
        changes["profile"] = profile
    if archs is not None:
        changes["archs"] = list(archs)
    if changes:  # validated before it is written: a typo must not leave params.yaml broken for the next run
        set_keys(path, changes, check=lambda raw: resolve(raw, f"{path} (with --profile/--archs applied)"))
    return list(read_yaml(path).get("archs") or [])


class WebhookSecretError(ValueError):
    """The Secret block named for the alert webhook is missing or holds no URL."""


SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")  # Prefect's block names


def secret_name(name: str) -> str:
    """`name` if it can be a Secret block's name; else an error that does not show it (a URL pasted by
    mistake must not end up in a log)."""
    if not SECRET_NAME.match(name):
        raise WebhookSecretError(
            "webhook_secret must be the NAME of a Secret block (lowercase letters, digits and "
            "dashes), not the webhook URL; the value given is not a block name and is not shown"
        )
    return name


def _missing(name: str) -> str:
    return (
        f"the Secret block {name!r} (flow parameter webhook_secret) does not exist on this Prefect server: create it "
        f"with `prefect block create secret` or `Secret(value=WEBHOOK_URL).save({name!r})`, or leave webhook_secret "
        f"unset and export {WEBHOOK_ENV}"
    )


def check_webhook_secret(name: str) -> None:
    """Fail now, naming the block, if the Secret block `name` does not exist: a nightly run whose
    failure alert cannot be sent should not be found out only when it fails. The server is asked
    with include_secrets=False, so the value does not leave it before an alert is due."""
    from prefect.client.orchestration import get_client

    secret_name(name)
    with get_client(sync_client=True) as client:
        try:
            client.read_block_document_by_name(name, block_type_slug="secret", include_secrets=False)
        except ObjectNotFound:
            raise WebhookSecretError(_missing(name)) from None


def load_webhook_secret(name: str) -> str:
    """The URL held by the Secret block `name`; errors name the block, never its value."""
    try:
        value = Secret.load(name).get()
    except ValueError:  # Prefect's "Unable to find block document named ..."
        raise WebhookSecretError(_missing(name)) from None
    if not isinstance(value, str) or urllib.parse.urlsplit(value.strip()).scheme not in ("http", "https"):
        raise WebhookSecretError(
            f"the Secret block {name!r} must hold the webhook URL (http:// or https://) as a string: "
            f"overwrite it with `Secret(value=WEBHOOK_URL).save({name!r}, overwrite=True)`"
        )
    return value.strip()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run, e.g. from a test
        return logging.getLogger(__name__)


def webhook_url(flow_run: Any) -> str | None:
    """The alert webhook, read at the moment of sending: from the Secret block named by the run's
    `webhook_secret` parameter, else from CIFARFLOW_WEBHOOK_URL; None (nothing sent) when neither is
    set, or when the block cannot be read then (a warning names the block)."""
    name = (flow_run.parameters or {}).get("webhook_secret")
    if not name:
        return os.environ.get(WEBHOOK_ENV) or None
    try:
        return load_webhook_secret(name)
    except Exception as exc:  # deleted since the run started, or the API is down: the hook must not raise
        _logger().warning(
            "alert not sent: %s",
            exc
            if isinstance(exc, WebhookSecretError)
            else f"cannot read the Secret block {name!r}: {type(exc).__name__}: {redact_text(str(exc))}",
        )
        return None


def describe_failure(exc: BaseException, url: str) -> str:
    """Why an alert failed, without the webhook's secret parts (its path holds the token)."""
    response = getattr(exc, "response", None)
    if response is not None:  # the endpoint answered: its status is what matters, not requests' "... for url: <url>"
        text = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    else:
        text = f"{type(exc).__name__}: {exc}"
    try:
        parts = urllib.parse.urlsplit(url)
        secret_parts = {
            url,
            requests.utils.requote_uri(url),
            parts.path,
            parts.query,
            parts.username,
            parts.password,
            urllib.parse.unquote(parts.path),
            f"{parts.path}?{parts.query}",
        }
    except ValueError:  # unparseable: nothing of the message can be trusted
        return type(exc).__name__
    for part in sorted((p for p in secret_parts if p and len(p) > 1), key=len, reverse=True):
        text = text.replace(part, REDACTED)
    text = QUOTED_URL.sub(lambda m: m.group(1) + REDACTED, text)
    return redact_text(URL_IN_TEXT.sub(lambda m: origin(m.group(0)), text))


def notify(url: str | None, text: str, **fields: Any) -> None:
    """POST a Slack-compatible JSON message; with no URL configured, send nothing. The URL is shown
    only as scheme and host: the rest of a webhook URL is its token."""
    if not url:
        return
    try:
        requests.post(url, json={"text": text, **fields}, timeout=10).raise_for_status()
    except Exception as exc:  # an alert that cannot be sent must not fail the run (any error, not only requests')
        _logger().warning("alert to %s failed: %s", origin(url), describe_failure(exc, url))


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    # The message goes to a third party: URLs in it (a data source's signature) are redacted.
    notify(
        webhook_url(flow_run),
        f"cifar10-pipeline run {flow_run.name} failed: {redact_text(str(state.message))}",
        event="failed",
        flow_run=flow_run.name,
    )


def alert_if_unblessed(flow: Any, flow_run: Any, state: Any) -> None:
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict) and not summary.get("blessed"):
        reasons = "; ".join(summary.get("blessing_reasons", []))
        notify(
            webhook_url(flow_run),
            f"cifar10-pipeline run {flow_run.name}: {summary.get('arch')} was not blessed ({reasons})",
            event="not_blessed",
            flow_run=flow_run.name,
            arch=summary.get("arch"),
        )


class StageRunner:
    """Calls the stage tasks in order, each told whether `dvc status` found it up to date, so DVC
    starts only for stages with work to do. After a stage that really ran, the status is taken
    again: its new outputs may have made later stages stale."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = str(workspace)
        self.stale = stale_stages(workspace)
        self.results: dict[str, Any] = {}

    def __call__(self, stage: str, stage_task: Any, *, timeout_s: float | None) -> None:
        result = stage_task(stage, self.workspace, timeout_s, up_to_date=stage not in self.stale)
        self.results[stage] = result
        if not result["skipped"]:
            self.stale = stale_stages(self.workspace)


def publish(workspace: Path) -> dict[str, Any]:
    """The leaderboard as a table artifact; the report and the verdict as markdown."""
    outputs = stage_outputs(workspace)
    card = json.loads((workspace / declared(outputs, "export") / MODEL_CARD).read_text())
    report = json.loads((workspace / declared(outputs, "report", "leaderboard.json")).read_text())
    create_table_artifact(
        key="leaderboard",
        description="val/test accuracy per architecture",
        table=[
            {
                "arch": r["arch"],
                "params": r["params"],
                "epochs": r["epochs"],
                "val_accuracy": r["val_accuracy"],
                "val_ci95": f"{r['val_ci95'][0]:.4f}-{r['val_ci95'][1]:.4f}",
                "test_accuracy": r["test_accuracy"],
                "test_ci95": f"{r['test_ci95'][0]:.4f}-{r['test_ci95'][1]:.4f}",
                "seed_reported_accuracy": r["seed_reported_accuracy"],
            }
            for r in report["rows"]
        ],
    )
    create_markdown_artifact(
        key="report",
        markdown=(workspace / declared(outputs, "report", "leaderboard.md")).read_text(),
        description="the leaderboard report",
    )
    verdict = "blessed" if card["blessed"] else "not blessed"
    champion = card.get("champion")
    against = f"champion {champion['version']} ({champion['test_accuracy']:.4f})" if champion else "no champion"
    create_markdown_artifact(
        key="blessing",
        description="the export's verdict",
        markdown="\n".join(
            [
                f"# {card['arch']}: {verdict}",
                "",
                f"Profile `{card['profile']}`, data source: {card['data_source_kind']}; verdict computed against {against}.",
                "",
                *[f"- {reason}" for reason in card["blessing_reasons"]],
            ]
        ),
    )
    return card


@flow(name="cifar10-pipeline", on_failure=[alert_on_failure], on_completion=[alert_if_unblessed])
def cifar10_pipeline(
    archs: list[str] | None = None,
    profile: str | None = None,
    workspace: str = ".",
    webhook_secret: str | None = None,
    promote: bool = True,
    stage_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage in `workspace`; returns a summary. `webhook_secret` names
    the Secret block holding the alert webhook URL (default: CIFARFLOW_WEBHOOK_URL, or no alerts)."""
    log = get_run_logger()
    if webhook_secret:
        check_webhook_secret(webhook_secret)
    ws = Path(workspace).resolve()
    selected = select(ws, archs, profile)
    params_check(str(ws))
    run = StageRunner(ws)
    for stage in DATA_STAGES:
        run(stage, data_stage, timeout_s=stage_timeout_s)
    for arch in selected:
        run(f"train@{arch}", train_stage, timeout_s=stage_timeout_s)
        run(f"evaluate@{arch}", evaluate_stage, timeout_s=stage_timeout_s)
    run("export", export_stage, timeout_s=stage_timeout_s)
    run("report", report_stage, timeout_s=stage_timeout_s)
    card = publish(ws)
    promotion = None
    if card["blessed"] and promote:  # the registry re-checks it against the champion as it is now
        from prefect.runtime import flow_run

        promotion = promote_export(str(ws), by=f"prefect flow run {flow_run.id} ({flow_run.name})")
    log.info(
        "exported %s (blessed=%s)%s", card["arch"], card["blessed"], f"; promotion: {promotion['message']}" if promotion else ""
    )
    return {
        "arch": card["arch"],
        "blessed": card["blessed"],
        "blessing_reasons": card["blessing_reasons"],
        "promoted": bool(promotion and promotion["promoted"]),
        "promotion": promotion,
        "archs": selected,
        "stages": run.results,
        "test_accuracy": card["test"]["accuracy"],
        "val_accuracy": card["val"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the cifar10-pipeline flow on Prefect's ephemeral server")
    parser.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    parser.add_argument("--profile", help="params profile, e.g. smoke")
    parser.add_argument("--workspace", default=".")
    parser.add_argument(
        "--webhook-secret",
        metavar="NAME",
        help=f"the Secret block holding the alert webhook URL (default: ${WEBHOOK_ENV}, else no alerts)",
    )
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args(argv)
    if args.webhook_secret:
        try:
            secret_name(args.webhook_secret)  # before the flow starts: parameters are stored
        except WebhookSecretError as exc:
            parser.error(str(exc))
    summary = cifar10_pipeline(
        archs=args.archs.split(",") if args.archs else None,
        profile=args.profile,
        workspace=args.workspace,
        webhook_secret=args.webhook_secret,
        promote=not args.no_promote,
    )
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
