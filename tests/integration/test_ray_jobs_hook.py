"""The Ray jobs hook, trigger and operator against a real token-auth Ray head."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from airflow.triggers.base import TriggerEvent

from pipeline.devstack.host import free_port
from pipeline.devstack.ray_cluster import RayHead
from ray_jobs.hooks import (
    TERMINAL_STATUSES,
    RayJobsAuthError,
    RayJobsHook,
    RayJobsUnreachableError,
    RaySubmissionExistsError,
)
from ray_jobs.operators import RayJobOperator
from ray_jobs.submission import base_submission_id, plan_submission, submit_new_job
from ray_jobs.triggers import RayJobTrigger
from tests.task_instance import FakeTaskInstance

pytestmark = pytest.mark.integration

HELLO = "python -c \"print('hello')\""
EXIT_3 = "python -c \"print('about to fail'); import sys; sys.exit(3)\""
SLEEP = 'python -c "import time; time.sleep(60)"'


@pytest.fixture
def hook(ray_head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayJobsHook:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", ray_head.airflow_conn_uri())
    return RayJobsHook("ray_test")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for_end(hook: RayJobsHook, submission_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = hook.get_job(submission_id)
        assert job is not None
        if job["status"] in TERMINAL_STATUSES:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {submission_id} still running after {timeout} s")


def collect(trigger: RayJobTrigger, timeout: float = 60) -> list[TriggerEvent]:
    async def run() -> list[TriggerEvent]:
        return [event async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(run(), timeout))


# -- hook --------------------------------------------------------------------------------------


def test_submit_poll_and_read_logs(hook: RayJobsHook, ray_head: RayHead) -> None:
    sid = _unique("hello")
    returned = hook.submit_job(entrypoint=HELLO, submission_id=sid, metadata={"purpose": "test"})
    job = wait_for_end(hook, sid)

    assert returned == sid
    assert job["status"] == "SUCCEEDED"
    assert job["driver_exit_code"] == 0
    assert job["metadata"] == {"purpose": "test"}
    assert job["end_time"] >= job["start_time"] > 0
    assert "hello" in hook.get_job_logs(sid).splitlines()
    assert sid in {listed["submission_id"] for listed in hook.list_jobs()}
    assert hook.dashboard_job_url(sid) == f"{ray_head.dashboard_url}/#/jobs/{sid}"
    assert hook.get_job("does-not-exist") is None


def test_failing_job_ends_failed_with_its_exit_code(hook: RayJobsHook) -> None:
    sid = hook.submit_job(entrypoint=EXIT_3, submission_id=_unique("exit3"))
    job = wait_for_end(hook, sid)

    assert job["status"] == "FAILED"
    assert job["driver_exit_code"] == 3
    assert "about to fail" in hook.get_job_logs(sid)


def test_duplicate_submission_id_is_a_clear_error(hook: RayJobsHook) -> None:
    sid = hook.submit_job(entrypoint=HELLO, submission_id=_unique("dup"))

    with pytest.raises(RaySubmissionExistsError, match=f"{sid}.*already exists"):
        hook.submit_job(entrypoint=HELLO, submission_id=sid)


def test_wrong_or_missing_token_explains_token_auth(
    ray_head: RayHead, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-head-token-0123456789")
    host = ray_head.dashboard_url.removeprefix("http://")
    monkeypatch.setenv("AIRFLOW_CONN_RAY_WRONG", f"http://{host}?auth_token_path={wrong}")
    with pytest.raises(RayJobsAuthError) as wrong_token:
        RayJobsHook("ray_wrong").list_jobs()

    message = str(wrong_token.value)
    assert "HTTP 403" in message and "RAY_AUTH_MODE=token" in message
    assert f"connection extra auth_token_path ({wrong})" in message
    for place in ("password", "auth_token_path", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray"):
        assert place in message
    assert "not-the-head-token" not in message

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_NO_TOKEN", f"http://{host}")
    with pytest.raises(RayJobsAuthError, match=r"HTTP 401.*this hook sent no token"):
        RayJobsHook("ray_no_token").get_job("anything")


def test_unreachable_address_fails_fast_naming_url_and_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AIRFLOW_CONN_RAY_NOWHERE", url)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    started = time.monotonic()
    with pytest.raises(RayJobsUnreachableError) as err:
        RayJobsHook("ray_nowhere", transient_error_budget_s=2).list_jobs()

    assert 2 <= time.monotonic() - started < 10  # retried for the budget, then gave up
    message = str(err.value)
    assert f"{url}/api/jobs/" in message
    assert "'ray_nowhere'" in message and "AIRFLOW_CONN_RAY_NOWHERE" in message
    assert "The Ray head is down or unreachable" in message
    assert "within transient_error_budget_s=2" in message


# -- trigger -----------------------------------------------------------------------------------


def test_trigger_yields_one_succeeded_event(hook: RayJobsHook, ray_head: RayHead) -> None:
    sid = hook.submit_job(entrypoint=HELLO, submission_id=_unique("trig"))
    trigger = RayJobTrigger(
        submission_id=sid, ray_conn_id="ray_test", poll_interval=0.2, result_uri="/r.json"
    )

    events = collect(trigger)

    assert [event.payload for event in events] == [
        {
            "status": "SUCCEEDED",
            "submission_id": sid,
            "message": "Job finished successfully.",
            "result_uri": "/r.json",
            "dashboard_url": f"{ray_head.dashboard_url}/#/jobs/{sid}",
            "stage": "",
            "was_being_stopped": False,
        }
    ]


def test_trigger_reports_missing_job_and_unreachable_ray(
    hook: RayJobsHook, ray_head: RayHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = collect(RayJobTrigger(submission_id="gone", ray_conn_id="ray_test"))
    assert [e.payload["status"] for e in missing] == ["MISSING"]
    assert (
        missing[0]
        .payload["message"]
        .startswith(
            f"Ray job gone does not exist on the Ray head at {ray_head.dashboard_url}: that head "
            "was restarted or replaced since the job was submitted, so the job's cluster is gone"
        )
    )

    monkeypatch.setenv("AIRFLOW_CONN_RAY_NOWHERE", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    error = collect(
        RayJobTrigger(submission_id="x", ray_conn_id="ray_nowhere", transient_error_budget_s=2)
    )
    assert 2 <= time.monotonic() - started < 8  # retried for the budget, then gave up
    assert [e.payload["status"] for e in error] == ["ERROR"]
    assert "cannot reach the Ray Jobs API" in error[0].payload["message"]
    assert "the head of a finished `make demo`" in error[0].payload["message"]


# -- re-attach decision ------------------------------------------------------------------------


def test_reattach_decision_follows_the_jobs_on_the_cluster(hook: RayJobsHook) -> None:
    key = base_submission_id("reattach", _unique("run"), "stage", -1)
    assert plan_submission(hook, key).action == "submit"
    submit = {"job_key": key, "metadata": {"dag_id": "reattach"}}

    first = submit_new_job(hook, try_number=1, entrypoint=SLEEP, **submit)
    plan = plan_submission(hook, key)
    assert (first, plan.action, plan.job and plan.job["submission_id"]) == (
        f"{key}-t1", "attach", first
    )  # fmt: skip
    assert plan.job and plan.job["metadata"] == {
        "dag_id": "reattach", "airflow_job_key": key, "try_number": "1",
        "airflow_submit_nonce": plan.job["metadata"]["airflow_submit_nonce"],
    }  # fmt: skip

    assert hook.stop_job(first) is True
    assert wait_for_end(hook, first)["status"] == "STOPPED"
    assert plan_submission(hook, key).action == "submit"

    # The same try number again (a cleared task) gets a suffixed id instead of an error.
    second = submit_new_job(hook, try_number=1, entrypoint=HELLO, **submit)
    assert second.startswith(f"{key}-t1-") and len(second) == len(first) + 7
    assert wait_for_end(hook, second)["status"] == "SUCCEEDED"
    plan = plan_submission(hook, key)
    assert (plan.action, plan.job and plan.job["submission_id"]) == ("reuse", second)


# -- operator ----------------------------------------------------------------------------------


def _writes_result(path: Path) -> str:
    code = (
        "import json, pathlib; "
        f"pathlib.Path({str(path)!r}).write_text(json.dumps("
        "{'stage': 'demo', 'mlflow_run_url': 'http://mlflow/r/1'}))"
    )
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def test_operator_defers_resumes_from_the_event_and_skips_a_succeeded_job(
    hook: RayJobsHook, tmp_path: Path
) -> None:
    result = tmp_path / "result.json"
    kwargs = {
        "task_id": "stage",
        "entrypoint": _writes_result(result),
        "ray_conn_id": "ray_test",
        "result_uri": str(result),
        "poll_interval": 0.2,
    }
    ti = FakeTaskInstance(run_id=_unique("run"))
    with pytest.raises(TaskDeferred) as deferred:
        RayJobOperator(**kwargs).execute({"ti": ti})  # type: ignore[typeddict-item]
    [event] = collect(deferred.value.trigger)  # type: ignore[arg-type]
    assert deferred.value.method_name == "execute_complete"
    assert ti.xcoms["mlflow_run_url"] == ""  # no link yet, and no missing-XCom error either

    # Airflow resumes on a fresh operator instance with only the event.
    resumed = RayJobOperator(**kwargs).execute_complete({"ti": ti}, event.payload)  # type: ignore[typeddict-item]
    assert resumed == {"stage": "demo", "mlflow_run_url": "http://mlflow/r/1"}
    sid = ti.xcoms["ray_submission_id"]
    assert sid == base_submission_id("ray_it", ti.run_id, "stage", -1) + "-t1"
    assert ti.xcoms["ray_dashboard_url"] == hook.dashboard_job_url(sid)
    assert ti.xcoms["mlflow_run_url"] == "http://mlflow/r/1"

    # A retry of the same task instance finds the SUCCEEDED job: no resubmission, no deferral.
    retry = FakeTaskInstance(run_id=ti.run_id, try_number=2)
    jobs_before = len(hook.list_jobs())
    assert RayJobOperator(**kwargs).execute({"ti": retry}) == resumed  # type: ignore[typeddict-item]
    assert retry.xcoms["ray_submission_id"] == sid
    assert len(hook.list_jobs()) == jobs_before


def test_operator_polling_synchronously_reports_failure_with_log_tail(hook: RayJobsHook) -> None:
    operator = RayJobOperator(
        task_id="stage", entrypoint=EXIT_3, ray_conn_id="ray_test", deferrable=False,
        poll_interval=0.2,
    )  # fmt: skip
    ti = FakeTaskInstance(run_id=_unique("run"))

    with pytest.raises(AirflowException) as err:
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    message = str(err.value)
    sid = ti.xcoms["ray_submission_id"]
    assert f"Ray job {sid} ended FAILED" in message
    assert "Last 60 lines of the job log:" in message
    assert message.rstrip().endswith("about to fail")


LEAKY_LINES = [
    "Authorization: Bearer sk-live-0123456789abcdef",
    "RAY_AUTH_TOKEN=raytok-0123456789",
    "export AWS_SECRET_ACCESS_KEY=awssecret/0123456789",
    "connecting to postgresql://mlflow:p@ss/w0rd@db:5432/mlflow",
    'payload {"password": "hunter2-json"}',
]
LEAKED = ["sk-live", "raytok", "awssecret", "p@ss", "w0rd", "hunter2"]


def test_job_logs_and_failure_report_reach_airflow_redacted(
    hook: RayJobsHook, capsys: pytest.CaptureFixture[str]
) -> None:
    code = f"for line in {LEAKY_LINES!r}: print(line)\nimport sys; sys.exit(3)"
    operator = RayJobOperator(
        task_id="stage", entrypoint=f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}",
        ray_conn_id="ray_test", poll_interval=0.2, log_interval_s=0.2,
    )  # fmt: skip
    ti = FakeTaskInstance(run_id=_unique("run"))
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    capsys.readouterr()
    [event] = collect(deferred.value.trigger)  # type: ignore[arg-type]
    logged = [line for line in capsys.readouterr().out.splitlines() if "[ray job]" in line]
    with pytest.raises(AirflowException) as err:
        operator.execute_complete({"ti": ti}, event.payload)  # type: ignore[typeddict-item]

    # The lines were streamed (the redacted forms show), and no secret is in any of them.
    shown = "\n".join(logged)
    for redacted in (
        "Authorization: Bearer ***",
        "RAY_AUTH_TOKEN=***",
        "export AWS_SECRET_ACCESS_KEY=***",
        "postgresql://***@db:5432/mlflow",
        'payload {"password": "***"}',
    ):
        assert redacted in shown
        assert redacted in str(err.value)  # the log tail of the failure report
    assert event.payload["status"] == "FAILED"
    assert "exit code 3" in event.payload["message"]  # Ray's message quotes the log's end
    for secret in LEAKED:
        assert secret not in shown
        assert secret not in event.payload["message"]
        assert secret not in str(err.value)


def test_a_run_whose_code_changed_under_it_fails_at_once_naming_both_versions(
    hook: RayJobsHook, tmp_path: Path
) -> None:
    """The image was redeployed mid-run: the stage exits 2 and the task fails without retries,
    saying which versions differ and how to go on (the policy of check_code_version)."""
    from pipeline.identity import CODE_VERSION_MISMATCH as STAGE_MARKER
    from pipeline.identity import code_version
    from ray_jobs.operators import CODE_VERSION_MISMATCH

    assert STAGE_MARKER == CODE_VERSION_MISMATCH  # the plugin does not import the pipeline
    entry = (
        f"{shlex.quote(sys.executable)} -m pipeline.stages.evaluate --config {tmp_path}/none.yaml"
        " --run-key k --code-version 0.1.0+src.0000000000"
    )
    ti = FakeTaskInstance(run_id=_unique("run"))
    operator = RayJobOperator(
        task_id="stage", entrypoint=entry, ray_conn_id="ray_test", poll_interval=0.2
    )
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    [event] = collect(deferred.value.trigger)  # type: ignore[arg-type]
    assert event.payload["status"] == "FAILED"
    with pytest.raises(AirflowFailException) as failed:
        operator.execute_complete({"ti": ti}, event.payload)  # type: ignore[typeddict-item]
    message = str(failed.value)
    assert (
        f"this run was resolved with pipeline 0.1.0+src.0000000000, but this Ray job runs "
        f"pipeline {code_version()}"
    ) in message
    assert "clear its resolve_config task with Downstream" in message


class _StateStore:
    """Stands in for Airflow's ``task_state_store`` (kept across a task instance's tries)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value


def test_the_next_try_starts_from_the_recorded_submission_and_lists_only_when_it_must(
    hook: RayJobsHook,
) -> None:
    py = shlex.quote(sys.executable)
    sleeper = f"{py} -u -c \"import time; print('step 1'); time.sleep(60)\""
    ti = FakeTaskInstance(run_id=_unique("run"))
    store = _StateStore()
    operator = RayJobOperator(task_id="stage", entrypoint=sleeper, ray_conn_id="ray_test")
    with pytest.raises(TaskDeferred) as first:
        operator.execute({"ti": ti, "task_state_store": store})  # type: ignore[typeddict-item]
    recorded = store.values["ray_submission_id"]
    assert first.value.trigger.submission_id == recorded  # type: ignore[attr-defined]
    key = base_submission_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    newer = None
    try:
        # The recorded job is running: decisive on its own.
        plan = plan_submission(hook, key, known_submission_id=recorded)
        assert (plan.action, plan.job and plan.job["submission_id"]) == ("attach", recorded)
        # It stopped, and a later try submitted again but died before recording it: the
        # recorded job is not decisive, and the listing finds the newer one.
        hook.stop_and_wait(recorded, 30)
        newer = submit_new_job(hook, job_key=key, try_number=2, entrypoint=sleeper, metadata={})
        plan = plan_submission(hook, key, known_submission_id=recorded)
        assert (plan.action, plan.job and plan.job["submission_id"]) == ("attach", newer)
    finally:
        for sid in (recorded, newer):
            if sid:
                hook.stop_job(sid)
