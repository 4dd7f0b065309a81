"""The no-work-pool alternative to `prefect deploy`: serve the nightly schedule from this process.

python -m flows.serve            # runs until stopped; schedules at 02:00 UTC
"""

from __future__ import annotations

from flows.pipeline import cifar10_pipeline

NIGHTLY_CRON = "0 2 * * *"  # prefect.yaml's nightly deployment uses the same schedule


def main() -> None:
    cifar10_pipeline.serve(name="nightly-serve", cron=NIGHTLY_CRON, parameters={"workspace": "."})


if __name__ == "__main__":
    main()
