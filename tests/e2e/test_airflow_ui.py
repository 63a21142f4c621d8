"""What a person sees in the Airflow UI, in a real browser, during and after one small run.

``airflow standalone`` (api-server, scheduler, dag-processor, triggerer; LocalExecutor on
SQLite) runs on a free port with its own AIRFLOW_HOME against the session's Ray head and MLflow
server. A run is triggered through the REST API with form fields only; headless Chromium
(Debian's ``chromium``, driven by Playwright; ``make browser`` installs it, nothing downloads a
browser) then checks the task states in the grid, both extra links while a training task runs,
the trainer's step lines in its task log, and the promotion decision. Screenshots go to
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pipeline.devstack.host import free_port
from pipeline.devstack.ray_cluster import RayHead

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "domain_llm_retraining"
TRAINING_TASK = "continued_pretraining"
STAGES = ["prepare_data", "continued_pretraining", "instruction_finetuning", "evaluate", "promote"]
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
# Form fields only (the DAG rejects any other conf key): small enough for a few minutes on
# two CPU cores, long enough (CPT) for the browser to see a training task while it runs.
RUN_CONF = {"cpt.max_steps": 12, "sft.max_steps": 4}
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


def _test_config(root: Path, mlflow_url: str) -> Path:
    """configs/demo.yaml with its own artifact root, the MLflow server and a smaller eval."""
    raw = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    raw["data"]["domain_corpus"] = str(REPO_ROOT / "configs" / "demo_data" / "domain.jsonl")
    raw["data"]["instructions"] = str(REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl")
    raw["eval"].update(max_documents=8, max_generations=2, max_new_tokens=8, bootstrap_samples=100)
    raw["storage"] = {"artifact_root": str(root / "artifacts")}
    # No artifact_location: the server stores and proxies artifacts, as in production.
    raw["tracking"] = {"tracking_uri": mlflow_url, "artifact_location": None, "ui_url": mlflow_url}
    path = root / "ui-test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


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


@pytest.fixture(scope="module")
def airflow(
    tmp_path_factory: pytest.TempPathFactory,
    ray_head: RayHead,
    mlflow_server: str,
) -> Iterator[Airflow]:
    root = tmp_path_factory.mktemp("airflow-ui")
    home = root / "airflow"  # a DB of its own: standalone migrates it (seconds on SQLite)
    home.mkdir()
    password = secrets.token_hex(8)
    (home / "passwords.json").write_text(json.dumps({"admin": password}))
    port = free_port()
    env = _airflow_env(home, port, _test_config(root, mlflow_server), ray_head)
    log = root / "standalone.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        yield Airflow(url, _wait_for_token(url, password, proc, log), home)
    finally:
        _stop_group(proc)


def _wait_for_dag(airflow: Airflow, timeout: float = 120) -> None:
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


def _wait_for_state(
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


def _stop_jobs_of(head: RayHead, run_id: str) -> None:
    """Stop the run's Ray jobs still going (a failed test must not leave training on the
    session's head; stopping Airflow does not stop them)."""
    headers = {"Authorization": f"Bearer {head.token_path.read_text().strip()}"}
    with httpx.Client(base_url=head.dashboard_url, headers=headers, timeout=30) as client:
        for job in client.get("/api/jobs/").json():
            mine = (job.get("metadata") or {}).get("run_id") == run_id
            if mine and job["status"] in ("PENDING", "RUNNING"):
                client.post(f"/api/jobs/{job['submission_id']}/stop")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Fails, not skips: CI must not pass without the browser test (`make browser` installs it).
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: run `make browser` (Debian's chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _page(browser: Any, airflow: Airflow) -> Any:
    """A page logged in with the API token (the UI reads the same JWT from its ``_token`` cookie)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.add_cookies([{"name": "_token", "value": airflow.token, "url": airflow.url}])
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def _shot(page: Any, name: str) -> None:
    folder = ARTIFACTS / "airflow_ui"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser: Any, airflow: Airflow, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A logged-in page; when the test fails its screenshot, text and links are kept."""
    opened = _page(browser, airflow)
    failures = request.session.testsfailed
    yield opened
    if request.session.testsfailed > failures:
        _shot(opened, "failed")
        links = opened.eval_on_selector_all(
            "a", "els => els.map(e => [e.innerText, e.getAttribute('href')])"
        )
        text = f"{opened.url}\n\n{opened.inner_text('body')}\n\nlinks: {links}"
        (ARTIFACTS / "airflow_ui" / "failed.txt").write_text(text)


def test_a_triggered_run_seen_in_the_browser(
    airflow: Airflow, page: Any, ray_head: RayHead, request: pytest.FixtureRequest
) -> None:
    _wait_for_dag(airflow)
    # What the form's "unpause on trigger" does; it must not start an unasked-for run.
    airflow.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    run = airflow.api(
        "POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": RUN_CONF}
    )
    run_id = run["dag_run_id"]
    request.addfinalizer(lambda: _stop_jobs_of(ray_head, run_id))
    task_url = f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/{TRAINING_TASK}"

    # While CPT trains (deferred on its Ray job): both links, and the trainer's lines so far.
    _wait_for_state(airflow, run_id, TRAINING_TASK, {"deferred"}, timeout=240)
    page.goto(f"{task_url}/details")  # the Details tab lists the extra links
    ray_link = page.get_by_role("link", name=re.compile("Ray job"))
    mlflow_link = page.get_by_role("link", name=re.compile("MLflow run"))
    ray_link.wait_for()
    mlflow_link.wait_for()
    _shot(page, "1-training-task-running")
    assert ray_link.get_attribute("href").startswith(f"{ray_head.dashboard_url}/#/jobs/")
    assert "/#/experiments/" in (mlflow_link.get_attribute("href") or "")
    page.goto(task_url)  # the Logs tab, refreshed while the task runs
    # Ray Train and DeepSpeed take a while to start on two busy cores.
    page.get_by_text(STEP_LINE).first.wait_for(timeout=150_000)
    _shot(page, "2-training-log-while-running")

    final = _wait_for_state(airflow, run_id, "promote", {"success", "skipped"}, timeout=300)
    assert all(final[stage] == "success" for stage in STAGES[:-1]), final

    # The grid: every task with its state.
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}")
    for stage in STAGES:
        page.get_by_text(stage).first.wait_for()
    _shot(page, "3-run-grid")

    # CPT's finished log: step lines and the stage summary.
    page.goto(task_url)
    page.get_by_text(STEP_LINE).first.wait_for()
    _shot(page, "4-training-log-finished")

    # Promotion: the decision is in promote's log (and its state says it).
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/promote")
    decision = "promoted" if final["promote"] == "success" else "rejected"
    page.get_by_text(re.compile(f"decision: {decision}")).first.wait_for()
    _shot(page, "5-promote-decision")

    runs = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns")["dag_runs"]
    assert [r["dag_run_id"] for r in runs] == [run_id], "an unasked-for run was started"
