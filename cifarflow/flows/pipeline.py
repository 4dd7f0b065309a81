"""The `cifar10-pipeline` flow: every stage of dvc.yaml in its order (resolve, download, preprocess,
validate, corrupt, train and evaluate per arch, export, report), each a `dvc repro --single-item`
task, then promote if blessed.

It only orchestrates: order (DVC's graph), retries (in cifarflow.tasks), artifacts, alerts. Stages
run one after another because one workspace has one DVC lock; parallelism across GPU nodes goes
through separate workspaces and a DVC remote. Run it locally on Prefect's ephemeral server with
`python -m cifarflow.flows.pipeline` or `cifarflow flow run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import requests
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.system import Secret
from prefect.exceptions import MissingContextError, ObjectNotFound

from cifarflow import flow_options, leaderboard, policy
from cifarflow.contract import LEADERBOARD_JSON, LEADERBOARD_MD, read_card, read_json
from cifarflow.errors import ConfigError
from cifarflow.flow_options import WEBHOOK_ENV, parameters
from cifarflow.flows import fanout
from cifarflow.redact import REDACTED, URL_IN_TEXT, origin, redact_text
from cifarflow.settings import load_params
from cifarflow.tasks.stages import params_check, pipeline_order, promote_export, stage_kind_task, stale_stages

# The webhook URL carries its token, so it is never a flow parameter (parameters are stored in
# Prefect's database and shown in the UI): the parameter `webhook_secret` names a Secret block
# (stored encrypted) and the URL is read from it, or from WEBHOOK_ENV, only when an alert is sent.
# requests quotes the URL, or its path and query, in its messages ("Max retries exceeded with url: /T0/B0/token").
QUOTED_URL = re.compile(r"((?:with|for) url: )\S+")
ALERT_TIMEOUT_S = 10.0  # one POST to the webhook; an alert that cannot be sent must not hold up the run
SQLITE_TIMEOUT_S = 60  # PREFECT_SERVER_DATABASE_TIMEOUT for the ephemeral server, unless set (see run_flow)


def stage_outputs(workspace: Path) -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares as its outs, metrics and plots. dvc.yaml is the only place
    stage paths are written: the flow reads them there."""
    from cifarflow.dvcfile import dvc_stage_outputs

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


def workspace_for(project: Path, profile: str | None) -> Path:
    """Where a run with `profile` works: the project itself for its selected profile (or none given),
    else the profile's private workspace, runs/<profile>/ (as `make pipeline PROFILE=...`, which
    `workspace.prepare` makes): a run of another profile never edits the project's params.yaml or
    replaces its data folder."""
    from cifarflow.bounded_yaml import read_yaml
    from cifarflow.settings import FULL
    from cifarflow.workspace import RUNS

    load_params(project / "params.yaml")  # a malformed file (profiles: 5, a list...) is a ConfigError naming it
    raw = read_yaml(project / "params.yaml")
    selected = raw.get("profile", FULL)
    if profile is None or profile == selected:
        return project
    known = [FULL, *dict(raw.get("profiles") or {})]
    if profile not in known:
        raise ConfigError(f"unknown profile {profile[:64]!r}; valid: {', '.join(known)} (profiles: in {project / 'params.yaml'})")
    return project / RUNS / profile


def archs_for_this_run(workspace: Path, archs: list[str] | None) -> Any:
    """params.yaml with `archs` set for this run, validated before it is written, and written back as
    it was when the run ends (workspace.run_scoped): the selection does not outlive the run."""
    from cifarflow.settings import resolve
    from cifarflow.workspace import run_scoped

    path = workspace / "params.yaml"
    return run_scoped(
        path,
        {"archs": list(archs)} if archs is not None else {},
        check=lambda raw: resolve(raw, f"{path} (with --archs applied)"),
    )


class WebhookSecretError(ConfigError):
    """The Secret block named for the alert webhook is missing or holds no URL: bad configuration (exit 2)."""


def secret_name(name: str) -> str:
    """`name` if it can be a Secret block's name (flow_options.secret_name's rule, for a deployment's
    parameter, which no parser checked); else an error that does not show it."""
    try:
        return flow_options.secret_name(name)
    except argparse.ArgumentTypeError as exc:
        raise WebhookSecretError(f"webhook_secret {exc}") from None


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
        requests.post(url, json={"text": text, **fields}, timeout=ALERT_TIMEOUT_S).raise_for_status()
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
        reasons = "; ".join(summary.get("failed_checks", []))
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

    def __call__(self, stage: str, *, timeout_s: float | None) -> None:
        result = stage_kind_task(stage)(stage, self.workspace, timeout_s, up_to_date=stage not in self.stale)
        self.results[stage] = result
        if not result["skipped"]:
            self.stale = stale_stages(self.workspace)


def publish(workspace: Path) -> dict[str, Any]:
    """The leaderboard as a table artifact; the report and the verdict as markdown."""
    outputs = stage_outputs(workspace)
    card = read_card(workspace / declared(outputs, "export"))
    report = read_json(workspace / declared(outputs, "report", LEADERBOARD_JSON), "report")
    create_table_artifact(
        key="leaderboard",
        description="val/test accuracy per architecture",
        table=leaderboard.artifact_table(report["rows"]),
    )
    create_markdown_artifact(
        key="report",
        markdown=(workspace / declared(outputs, "report", LEADERBOARD_MD)).read_text(),
        description="the leaderboard report",
    )
    verdict = card["verdict"]
    champion = verdict["champion"]
    against = f"champion {champion['version']} ({champion['test_accuracy']:.4f})" if champion else "no champion"
    create_markdown_artifact(
        key="blessing",
        description="the export's verdict",
        markdown="\n".join(
            [
                f"# {card['arch']}: {'blessed' if verdict['blessed'] else 'not blessed'}",
                "",
                f"Profile `{card['profile']}`, data source: {card['data_source_kind']}; verdict computed against {against}.",
                "",
                *policy.markdown(verdict),
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
    from prefect.runtime import flow_run

    from cifarflow.bounded_yaml import read_yaml
    from cifarflow.workspace import flow_lock, prepare

    log = get_run_logger()
    if webhook_secret:
        check_webhook_secret(webhook_secret)
    project = Path(workspace).resolve()
    ws = workspace_for(project, profile)
    fanned_out = None
    with flow_lock(ws, f"prefect flow run {flow_run.id} ({flow_run.name})"):
        if ws != project:  # the private workspace, refreshed from the project under its lock
            prepare(project, str(profile))
        with archs_for_this_run(ws, archs):
            selected = list(read_yaml(ws / "params.yaml").get("archs") or [])
            params_check(str(ws))
            params = load_params(ws / "params.yaml")
            if params.cluster is not None and (archs is not None or ws != project):
                raise ConfigError(
                    "cluster: the children train the committed params.yaml as it is: run without --archs and "
                    "--profile (commit the archs and profile you want)"
                )
            run = StageRunner(ws)
            for stage in pipeline_order(ws):
                if params.cluster is not None and stage.startswith(f"{fanout.TRAIN}@"):
                    if fanned_out is None:  # every stale training at once, on the pool; then restored here
                        stale = [arch for arch in selected if f"{fanout.TRAIN}@{arch}" in run.stale]
                        fanned_out = fanout.fan_out(ws, params, stale) if stale else {}
                        fanout.gather(ws, stale)
                        run.stale = stale_stages(ws)
                    continue
                run(stage, timeout_s=stage_timeout_s)
            card = publish(ws)
            verdict = card["verdict"]
            promotion = None
            if verdict["blessed"] and promote:  # the registry decides again, against the champion as it is now
                promotion = promote_export(str(ws), by=f"prefect flow run {flow_run.id} ({flow_run.name})")
    log.info(
        "exported %s (blessed=%s)%s",
        card["arch"],
        verdict["blessed"],
        f"; promotion: {promotion['message']}" if promotion else "",
    )
    return {
        "workspace": str(ws),
        "arch": card["arch"],
        "blessed": verdict["blessed"],
        "failed_checks": [c["reason"] for c in verdict["checks"] if not c["passed"]],
        "promoted": bool(promotion and promotion["promoted"]),
        "promotion": promotion,
        "archs": selected,
        "stages": run.results,
        "cluster": fanned_out,  # per architecture: its child's runs and their workers (no cluster: null)
        "test_accuracy": card["test"]["accuracy"],
        "val_accuracy": card["val"]["accuracy"],
    }


def check_prefect_home() -> None:
    """Prefect keeps its settings and the ephemeral server's database in PREFECT_HOME: a folder it cannot
    write there fails only after the server's start-up times out, as something else. Found now."""
    from prefect.settings import PREFECT_HOME

    home = Path(os.environ.get("PREFECT_HOME") or PREFECT_HOME.value()).expanduser()  # the variable wins, as for Prefect
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"PREFECT_HOME {home} is not writable ({exc.strerror or exc.__class__.__name__}): Prefect keeps its "
            "database there; set PREFECT_HOME to a folder you can write, or fix its permissions"
        ) from None


def run_flow(args: argparse.Namespace) -> dict[str, Any]:
    """The flow with the parsed options (flow_options.add_options), its summary printed as JSON. What
    can be checked before the flow starts is (a bad option exits 2 with one line, not a failed run's
    traceback); the console shows progress, and everything goes to a log file in .cifarflow/logs/."""
    from cifarflow import console

    check_prefect_home()
    # SQLite's default lock wait (5 s) loses to the flow's own bursts of writes on a slow disk:
    # "database is locked" tracebacks, 503s. Waiting longer is what Prefect's docs advise.
    os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", str(SQLITE_TIMEOUT_S))
    if args.webhook_secret:
        check_webhook_secret(args.webhook_secret)
    log_file = console.log_to_file(Path(args.workspace) / ".cifarflow" / "logs", "flow-run")
    logging.getLogger("cifarflow").info("flow run: the full log (every library, DEBUG) is in %s", log_file)
    summary = cifar10_pipeline(**parameters(args))
    print(json.dumps(summary, indent=2, default=str))
    return summary
