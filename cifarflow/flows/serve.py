"""The no-work-pool alternative to `prefect deploy`: serve prefect.yaml's nightly deployment (its
schedule and parameters, read from there: one place) from this process, until it is stopped.

    prefect server start                               # in another shell: the server that keeps the schedule
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m cifarflow.flows.serve                    # from the project root
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifarflow.errors import ConfigError

DEPLOYMENT = "nightly"


def nightly(project: Path) -> dict[str, Any]:
    """prefect.yaml's `nightly` deployment."""
    from cifarflow.bounded_yaml import read_yaml

    path = project / "prefect.yaml"
    for deployment in read_yaml(path).get("deployments") or []:
        if isinstance(deployment, dict) and deployment.get("name") == DEPLOYMENT:
            return deployment
    raise ConfigError(f"{path}: no deployment named {DEPLOYMENT!r}; run from the project root")


def main() -> None:
    from prefect.schedules import Cron

    from cifarflow.flows.pipeline import cifar10_pipeline

    deployment = nightly(Path.cwd())
    schedules = [Cron(s["cron"], timezone=s.get("timezone") or "UTC") for s in deployment.get("schedules") or []]
    cifar10_pipeline.serve(name=f"{DEPLOYMENT}-serve", schedules=schedules, parameters=deployment.get("parameters") or {})


if __name__ == "__main__":
    main()
