"""``airflow standalone`` and headless Chromium for the end-to-end tests (not a test module).

``airflow standalone`` (api-server, scheduler, dag-processor, triggerer; LocalExecutor on
SQLite) runs on a free port with its own AIRFLOW_HOME against a given Ray head; runs are
triggered through its REST API. The browser is Debian's ``chromium`` driven by Playwright
(``make browser`` installs it; nothing downloads a browser). Screenshots go to
``tests/artifacts/airflow_ui/`` (or ``$PIPELINE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.devstack.host import free_port
from pipeline.devstack.ray_cluster import RayHead

REPO_ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "domain_llm_retraining"
CHROMIUM = Path(os.environ.get("PIPELINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
STEP_LINE = re.compile(r"step \d+/\d+ loss \d+\.\d+")


@dataclass(frozen=True)
class Airflow:
    url: str
    token: str
    home: Path

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(
            method,
            f"{self.url}/api/v2{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kwargs,
        )
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def task_states(self, run_id: str) -> dict[str, str | None]:
        listed = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in listed["task_instances"]}


def _airflow_env(home: Path, port: int, config: Path, head: RayHead) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # standalone runs `airflow ...`
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
        "AIRFLOW_CONN_RAY_DEFAULT": head.airflow_conn_uri(),
        "PIPELINE_CONFIG": str(config),
        "PIPELINE_RAY_POLL_INTERVAL": "2",
    }


def _wait_for_token(url: str, password: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"airflow standalone exited with {proc.returncode}; see {log}")
        try:
            response = httpx.post(
                f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=5
            )
            if response.status_code == 201 or response.status_code == 200:
                token: str = response.json()["access_token"]
                return token
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the Airflow API server at {url} did not answer in 180 s; see {log}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT is standalone's own way to stop its components; then make sure."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # Components (task supervisors, triggerer) may outlive the standalone process.
            os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@contextmanager
def standalone_airflow(root: Path, config: Path, head: RayHead) -> Iterator[Airflow]:
    """``airflow standalone`` with a DB of its own under ``root`` (it migrates it: seconds on
    SQLite), ``PIPELINE_CONFIG=config`` and ``ray_default`` on ``head``; the environment is
    this process's, so connections set in ``os.environ`` reach its tasks and callbacks."""
    home = root / "airflow"
    home.mkdir()
    password = secrets.token_hex(8)
    (home / "passwords.json").write_text(json.dumps({"admin": password}))
    port = free_port()
    log = root / "standalone.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=_airflow_env(home, port, config, head),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        yield Airflow(url, _wait_for_token(url, password, proc, log), home)
    finally:
        _stop_group(proc)


def wait_for_dag(airflow: Airflow, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = airflow.api("GET", "/importErrors")["import_errors"]
        assert not errors, errors
        response = httpx.get(
            f"{airflow.url}/api/v2/dags/{DAG_ID}",
            headers={"Authorization": f"Bearer {airflow.token}"},
            timeout=10,
        )
        if response.status_code == 200:
            return
        time.sleep(2)
    raise AssertionError(f"the dag-processor did not parse {DAG_ID} within {timeout} s")


def wait_for_state(
    airflow: Airflow, run_id: str, task_id: str, states: set[str], timeout: float
) -> dict[str, str | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = airflow.task_states(run_id)
        if current.get(task_id) in states:
            return current
        failed = {t: s for t, s in current.items() if s in ("failed", "upstream_failed")}
        assert not failed, f"tasks failed before {task_id} reached {states}: {current}"
        time.sleep(2)
    raise AssertionError(
        f"{task_id} not in {states} after {timeout} s: {airflow.task_states(run_id)}"
    )


def stop_jobs_of(head: RayHead, run_id: str) -> None:
    """Stop the run's Ray jobs still going (a failed test must not leave training on the
    session's head; stopping Airflow does not stop them)."""
    headers = {"Authorization": f"Bearer {head.token_path.read_text().strip()}"}
    with httpx.Client(base_url=head.dashboard_url, headers=headers, timeout=30) as client:
        for job in client.get("/api/jobs/").json():
            mine = (job.get("metadata") or {}).get("run_id") == run_id
            if mine and job["status"] in ("PENDING", "RUNNING"):
                client.post(f"/api/jobs/{job['submission_id']}/stop")


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Debian chromium under Playwright. Fails, not skips, when it is missing: CI must
    not pass without the browser test (`make browser` installs it)."""
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: run `make browser` (Debian's chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, airflow: Airflow) -> Any:
    """A page logged in with the API token (the UI reads the same JWT from its ``_token`` cookie)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.add_cookies([{"name": "_token", "value": airflow.token, "url": airflow.url}])
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def shot(page: Any, name: str) -> None:
    folder = ARTIFACTS / "airflow_ui"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def keep_failure(page: Any) -> None:
    """The page's screenshot, text and links, kept for a failed test."""
    shot(page, "failed")
    links = page.eval_on_selector_all(
        "a", "els => els.map(e => [e.innerText, e.getAttribute('href')])"
    )
    text = f"{page.url}\n\n{page.inner_text('body')}\n\nlinks: {links}"
    (ARTIFACTS / "airflow_ui" / "failed.txt").write_text(text)
