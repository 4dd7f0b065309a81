"""The `cifar10-pipeline` flow: download -> preprocess -> validate -> (train, evaluate) per arch
-> export -> report -> promote if blessed, each stage a `dvc repro --single-item` task.

It only orchestrates: order, retries (in tasks/), artifacts, alerts. Stages run one after
another because one workspace has one DVC lock; parallelism across GPU nodes goes through
separate workspaces and a DVC remote. Run it locally on Prefect's ephemeral server with
`python -m flows.pipeline` or `cifarflow flow run`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import requests
import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

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

WEBHOOK_ENV = "CIFARFLOW_WEBHOOK_URL"
DATA_STAGES = ("download", "preprocess", "validate")


def select(workspace: Path, archs: list[str] | None, profile: str | None) -> list[str]:
    """Apply the flow's selection to params.yaml, as `dvc exp run -S` would, so that a plain
    `dvc repro` afterwards agrees with what ran; return the architectures to run."""
    path = workspace / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    changed = False
    if profile is not None and raw.get("profile") != profile:
        raw["profile"], changed = profile, True
    if archs is not None and raw.get("archs") != list(archs):
        raw["archs"], changed = list(archs), True
    if changed:
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return list(raw.get("archs") or [])


def webhook_url(flow_run: Any) -> str | None:
    return (flow_run.parameters or {}).get("webhook_url") or os.environ.get(WEBHOOK_ENV)


def notify(url: str | None, text: str, **fields: Any) -> None:
    """POST a Slack-compatible JSON message; with no URL configured, send nothing."""
    if not url:
        return
    try:
        requests.post(url, json={"text": text, **fields}, timeout=10).raise_for_status()
    except requests.RequestException as exc:  # an alert that cannot be sent must not fail the run
        get_run_logger().warning("alert to %s failed: %s", url, exc)


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    notify(webhook_url(flow_run), f"cifar10-pipeline run {flow_run.name} failed: {state.message}",
           event="failed", flow_run=flow_run.name)


def alert_if_unblessed(flow: Any, flow_run: Any, state: Any) -> None:
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict) and not summary.get("blessed"):
        reasons = "; ".join(summary.get("blessing_reasons", []))
        notify(webhook_url(flow_run), f"cifar10-pipeline run {flow_run.name}: {summary.get('arch')} was not "
               f"blessed ({reasons})", event="not_blessed", flow_run=flow_run.name, arch=summary.get("arch"))


class StageRunner:
    """Calls the stage tasks in order, each told whether `dvc status` found it up to date, so DVC
    starts only for stages with work to do. After a stage that really ran, the status is taken
    again: its new outputs may have made later stages stale."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = str(workspace)
        self.stale = stale_stages(workspace)
        self.results: dict[str, Any] = {}

    def __call__(self, stage: str, stage_task: Any, *args: Any, timeout_s: float | None) -> None:
        result = stage_task(*args, self.workspace, timeout_s, up_to_date=stage not in self.stale)
        self.results[stage] = result
        if not result["skipped"]:
            self.stale = stale_stages(self.workspace)


def publish(workspace: Path) -> dict[str, Any]:
    """The leaderboard as a table artifact; the report and the verdict as markdown."""
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    report = json.loads((workspace / "data/reports/leaderboard.json").read_text())
    create_table_artifact(key="leaderboard", description="val/test accuracy per architecture", table=[
        {"arch": r["arch"], "params": r["params"], "epochs": r["epochs"], "val_accuracy": r["val_accuracy"],
         "val_ci95": f"{r['val_ci95'][0]:.4f}-{r['val_ci95'][1]:.4f}", "test_accuracy": r["test_accuracy"],
         "test_ci95": f"{r['test_ci95'][0]:.4f}-{r['test_ci95'][1]:.4f}",
         "seed_reported_accuracy": r["seed_reported_accuracy"]} for r in report["rows"]])
    create_markdown_artifact(key="report", markdown=(workspace / "data/reports/leaderboard.md").read_text(),
                             description="the leaderboard report")
    verdict = "blessed" if card["blessed"] else "not blessed"
    create_markdown_artifact(key="blessing", description="the export's verdict", markdown="\n".join(
        [f"# {card['arch']}: {verdict}", "", *[f"- {reason}" for reason in card["blessing_reasons"]]]))
    return card


@flow(name="cifar10-pipeline", on_failure=[alert_on_failure], on_completion=[alert_if_unblessed])
def cifar10_pipeline(archs: list[str] | None = None, profile: str | None = None, workspace: str = ".",
                     webhook_url: str | None = None, promote: bool = True,
                     stage_timeout_s: float | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage in `workspace`; returns a summary."""
    log = get_run_logger()
    ws = Path(workspace).resolve()
    selected = select(ws, archs, profile)
    params_check(str(ws))
    run = StageRunner(ws)
    for stage in DATA_STAGES:
        run(stage, data_stage, stage, timeout_s=stage_timeout_s)
    for arch in selected:
        run(f"train@{arch}", train_stage, arch, timeout_s=stage_timeout_s)
        run(f"evaluate@{arch}", evaluate_stage, arch, timeout_s=stage_timeout_s)
    run("export", export_stage, timeout_s=stage_timeout_s)
    run("report", report_stage, timeout_s=stage_timeout_s)
    card = publish(ws)
    promoted = promote_export(str(ws)) if card["blessed"] and promote else None
    log.info("exported %s (blessed=%s)%s", card["arch"], card["blessed"], ", promoted" if promoted else "")
    return {"arch": card["arch"], "blessed": card["blessed"], "blessing_reasons": card["blessing_reasons"],
            "promoted": bool(promoted), "archs": selected, "stages": run.results,
            "test_accuracy": card["test"]["accuracy"], "val_accuracy": card["val"]["accuracy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the cifar10-pipeline flow on Prefect's ephemeral server")
    parser.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    parser.add_argument("--profile", help="params profile, e.g. smoke")
    parser.add_argument("--workspace", default=".")
    parser.add_argument("--webhook-url")
    parser.add_argument("--no-promote", action="store_true")
    args = parser.parse_args(argv)
    summary = cifar10_pipeline(archs=args.archs.split(",") if args.archs else None, profile=args.profile,
                               workspace=args.workspace, webhook_url=args.webhook_url, promote=not args.no_promote)
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
