"""Secrets are never stored: the alert webhook URL (its path is the token) and credentials in a
`data.source` URL (a signed query string) must not reach Prefect's database, the server log, the
run's parameters or logs, the workspace's files, or a failed alert's log line.

The fast tests check the flow's interface and `notify`; the slow ones run the flow in-process
against a real `prefect server start` and then search every place a secret could have landed."""

from __future__ import annotations

import http.server
import inspect
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO, cli_env, free_port, set_params
from test_prefect import api, run_flow

from cifarflow.flows import pipeline

SECRET_BLOCK = "cifarflow-webhook-hostile"


class Hook(http.server.ThreadingHTTPServer):
    """A webhook endpoint that keeps what it is sent (path and JSON body) and answers `status`."""

    daemon_threads = True

    def __init__(self, status: int) -> None:
        self.status = status
        self.received: list[tuple[str, dict[str, Any]]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append((self.path, json.loads(body)))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, token: str) -> str:
        """A Slack-style webhook URL: the token is the last path segment."""
        return f"{self.origin}/services/T000/B000/{token}"


@contextmanager
def serving(status: int) -> Iterator[Hook]:
    hook = Hook(status)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        yield hook
    finally:
        hook.shutdown()
        hook.server_close()


# --- fast: the interface and notify -----------------------------------------------------------------


def test_the_flow_takes_no_webhook_url() -> None:
    """A parameter value is stored by Prefect and shown in the UI: no parameter may carry a URL."""
    from cifarflow.cli import build_parser

    names = list(inspect.signature(pipeline.cifar10_pipeline.fn).parameters)
    assert "webhook_url" not in names and "webhook_secret" in names
    assert [name for name in names if "url" in name.lower()] == []
    with pytest.raises(SystemExit):  # argparse: unrecognized argument
        build_parser().parse_args(["flow", "run", "--webhook-url", "https://hooks.example.com/services/T/B/x"])
    assert (
        build_parser().parse_args(["flow", "run", "--webhook-secret", "cifarflow-webhook"]).webhook_secret == "cifarflow-webhook"
    )


def failed_alert_logs(caplog: pytest.LogCaptureFixture, url: str) -> list[str]:
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        pipeline.notify(url, "cifar10-pipeline run r failed", event="failed")
    return [r.getMessage() for r in caplog.records if r.name == pipeline.__name__]


def test_a_failed_alert_shows_only_scheme_and_host(caplog: pytest.LogCaptureFixture) -> None:
    token = secrets.token_hex(16)
    with serving(500) as hook:
        messages = failed_alert_logs(caplog, hook.url(token))
        assert [path for path, _ in hook.received] == [f"/services/T000/B000/{token}"]  # it was sent
    assert messages == [f"alert to {hook.origin} failed: HTTP 500 Internal Server Error"]


@pytest.mark.parametrize("shape", ["path", "query", "userinfo"])
def test_an_unreachable_webhook_is_not_quoted(caplog: pytest.LogCaptureFixture, shape: str) -> None:
    """requests' ConnectionError quotes the URL's path and query ("Max retries exceeded with url:
    /services/...?token=..."): none of it may reach the log."""
    token, port = secrets.token_hex(16), free_port()  # nothing listens on `port`
    url = {
        "path": f"http://127.0.0.1:{port}/services/T000/B000/{token}",
        "query": f"http://127.0.0.1:{port}/hook?token={token}&sig=%2F{token}",
        "userinfo": f"http://alerts:{token}@127.0.0.1:{port}/hook",
    }[shape]
    messages = failed_alert_logs(caplog, url)
    assert len(messages) == 1 and messages[0].startswith(f"alert to http://127.0.0.1:{port} failed: ConnectionError")
    assert "refused" in messages[0].lower(), messages[0]  # the reason is still there
    assert token not in messages[0], messages[0]


def test_the_environment_variable_is_read_when_no_block_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    run = SimpleNamespace(name="r", parameters={"webhook_secret": None})
    monkeypatch.delenv(pipeline.WEBHOOK_ENV, raising=False)
    assert pipeline.webhook_url(run) is None
    monkeypatch.setenv(pipeline.WEBHOOK_ENV, "https://hooks.example.com/services/T/B/x")
    assert pipeline.webhook_url(run) == "https://hooks.example.com/services/T/B/x"


def test_the_failure_alert_does_not_forward_a_signed_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The alert goes to a third party: a data source's signature in the failure message stays out."""
    signature = secrets.token_hex(32)
    state = SimpleNamespace(message=f"download failed: http://mirror.example/c.tgz?X-Amz-Signature={signature}: 403")
    with serving(200) as hook:
        monkeypatch.setenv(pipeline.WEBHOOK_ENV, hook.url("t"))
        pipeline.alert_on_failure(None, SimpleNamespace(name="r", parameters={}), state)
    [(_, alert)] = hook.received
    assert alert["event"] == "failed" and "mirror.example" in alert["text"] and signature not in alert["text"]


# --- slow: a real server, a failing run, and a search of everything it left ---------------------------


@pytest.fixture
def server(prefect_server: dict[str, str]) -> dict[str, str]:
    """The session's Prefect server (test_prefect.prefect_server). One server for the whole suite: a
    second one would leave Prefect's process-wide event client bound to it after it stopped, and the
    task runs of later tests' flows would be lost. Its database and log are searched whole: only
    this module's secrets are random tokens nobody else writes."""
    return prefect_server


def save_secret(env: dict[str, str], name: str, value: str) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        Secret(value=value).save(name, overwrite=True)


def run_logs(env: dict[str, str], flow_run_id: str, until: str, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The flow run's logs (flow, tasks and hooks) once a line containing `until` has arrived: the
    in-process handler sends them in batches."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is queued now (it blocks up to 5 s)
    deadline = time.monotonic() + timeout_s
    while True:
        logs: list[dict[str, Any]] = []
        while page := api(
            env,
            "POST",
            "/logs/filter",
            logs={"flow_run_id": {"any_": [flow_run_id]}},
            sort="TIMESTAMP_ASC",
            limit=200,
            offset=len(logs),
        ):
            logs += page
        if any(until in entry["message"] for entry in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


class Finds:
    """Where each secret was found, with a little context, for an assertion message that says where."""

    def __init__(self, **needles: str) -> None:
        self.needles = {name: value.encode() for name, value in needles.items()}
        self.places: dict[str, list[str]] = {name: [] for name in needles}
        self.searched: list[str] = []

    def search(self, where: str, data: bytes | str) -> None:
        blob = data.encode() if isinstance(data, str) else data
        self.searched.append(where)
        for name, needle in self.needles.items():
            at = blob.find(needle)
            if at >= 0:
                context = blob[max(0, at - 160) : at + len(needle) + 40].decode(errors="replace")
                self.places[name].append(f"{where}: ...{context}...")

    def search_tree(self, label: str, root: Path, skip: set[str] = frozenset()) -> None:
        for folder, _dirs, files in os.walk(root):  # symlinks are not followed: they point outside
            for file in files:
                path = Path(folder) / file
                rel = path.relative_to(root).as_posix()
                if rel not in skip and not path.is_symlink():
                    self.search(f"{label}/{rel}", path.read_bytes())

    def report(self, *names: str) -> str:
        return "\n".join(f"{name} found in {place}" for name in names for place in self.places[name])


@pytest.mark.slow
def test_no_secret_is_stored_anywhere(server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token, signature, credential = secrets.token_hex(20), secrets.token_hex(32), f"AKIA{secrets.token_hex(8).upper()}"
    dead_port = free_port()
    mirror = (
        f"http://127.0.0.1:{dead_port}/cifar.tgz"  # nothing listens there: the download fails
        f"?X-Amz-Signature={signature}&X-Amz-Credential={credential}%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    )
    set_params(
        workspace,
        **{
            "profiles.smoke.data.source": [mirror],
            "profiles.smoke.data.md5": None,
            "profiles.smoke.data.allow_unverified": True,
            "profiles.smoke.data.retries": 0,
        },
    )
    monkeypatch.delenv(pipeline.WEBHOOK_ENV, raising=False)
    with serving(500) as hook:  # it takes the alert, then answers 500: the failed-alert log line is searched too
        save_secret(server, SECRET_BLOCK, hook.url(token))
        state = run_flow(server, monkeypatch, workspace, webhook_secret=SECRET_BLOCK)
        assert state.is_failed(), "the download from a dead mirror should fail the run"
        flow_run_id = str(state.state_details.flow_run_id)
        logs = run_logs(server, flow_run_id, until="alert to")

    # The alert went out, through the Secret's URL (its token).
    assert [(path, alert["event"]) for path, alert in hook.received] == [(f"/services/T000/B000/{token}", "failed")]
    alert_lines = [entry["message"] for entry in logs if entry["message"].startswith("alert to")]
    assert alert_lines == [f"alert to {hook.origin} failed: HTTP 500 Internal Server Error"], alert_lines
    # The stage's own output (the CLI's log lines, streamed by the task) was captured: it is searched below.
    assert any("cifarflow download" in entry["message"] for entry in logs), [entry["message"] for entry in logs]

    flow_run = api(server, "GET", f"/flow_runs/{flow_run_id}")
    assert flow_run["parameters"]["webhook_secret"] == SECRET_BLOCK
    assert not [key for key, value in flow_run["parameters"].items() if "://" in json.dumps(value)], flow_run["parameters"]
    task_runs = api(server, "POST", "/task_runs/filter", task_runs={"flow_run_id": {"any_": [flow_run_id]}})
    assert any(run["name"] == "download" and run["state"]["type"] == "FAILED" for run in task_runs)

    # `mirror_host` is a control: it is not secret, so it must be found where the searches look.
    found = Finds(webhook_token=token, signature=signature, credential=credential, mirror_host=f"127.0.0.1:{dead_port}")
    found.search("API: the flow run (parameters, state)", json.dumps(flow_run))
    found.search("API: its task runs", json.dumps(task_runs))
    found.search("API: its logs (/logs/filter)", json.dumps(logs))
    found.search("the alert sent to the webhook", json.dumps([alert for _, alert in hook.received]))
    home = Path(server["PREFECT_HOME"])
    assert (home / "prefect.db").stat().st_size > 0 and (home / "server.log").is_file()
    found.search_tree("PREFECT_HOME", home)  # prefect.db (+ -wal), server.log, result storage
    found.search_tree("workspace", workspace, skip={"params.yaml", "dvc.lock"})  # data/runinfo/, .dvc/tmp, ...
    controls = " ".join(found.places["mirror_host"])
    assert "API: its logs" in controls and "PREFECT_HOME/prefect.db" in controls, (
        f"the searches cannot see what the run stored (control not found): {found.places['mirror_host']}"
    )
    assert found.places["webhook_token"] == [], "the webhook token (Secret block value) was stored or logged:\n" + found.report(
        "webhook_token"
    )
    assert found.places["signature"] == found.places["credential"] == [], (
        "data.source credentials (X-Amz-Signature / X-Amz-Credential of a signed mirror URL) were stored or logged. "
        "The flow itself only passes on what cifarflow/data/download.py and fetch.py put into their log lines, "
        "exception messages and run info (the task's state message and log are the CLI's stderr); the redaction "
        "there is another engineer's work in progress:\n" + found.report("signature", "credential")
    )


@pytest.mark.slow
def test_a_missing_secret_block_fails_the_run_by_name(
    server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chosen behaviour: a run naming a block that does not exist fails before any stage runs, with a
    message naming the block and how to create it; the failure hook then warns and sends nothing."""
    missing = f"no-such-webhook-{secrets.token_hex(4)}"
    state = run_flow(server, monkeypatch, tmp_path, webhook_secret=missing)
    assert state.is_failed()
    assert missing in state.message and "prefect block create secret" in state.message, state.message
    flow_run_id = str(state.state_details.flow_run_id)
    assert api(server, "POST", "/task_runs/filter", task_runs={"flow_run_id": {"any_": [flow_run_id]}}) == [], (
        "no task should run before the check (not even params-check)"
    )
    logs = run_logs(server, flow_run_id, until="alert not sent")
    assert any(entry["message"].startswith(f"alert not sent: the Secret block '{missing}'") for entry in logs), [
        entry["message"] for entry in logs
    ]


def test_a_webhook_url_given_as_the_block_name_is_refused_unechoed() -> None:
    """An operator who pastes the URL instead of the block's name: refused before it becomes a stored
    flow parameter, and not shown."""
    from cifarflow.flows.pipeline import WebhookSecretError, secret_name

    url = "https://hooks.example.com/services/T0/B0/XOXSECRET"
    with pytest.raises(WebhookSecretError) as refused:
        secret_name(url)
    assert "XOXSECRET" not in str(refused.value) and "not the webhook URL" in str(refused.value)
    done = subprocess.run(
        [sys.executable, "-m", "cifarflow", "flow", "run", "--webhook-secret", url],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "XOXSECRET" not in done.stdout + done.stderr
    assert secret_name("cifarflow-webhook") == "cifarflow-webhook"
