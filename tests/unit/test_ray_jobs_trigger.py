"""Unit tests of the Ray jobs plugin: no Ray head, no network."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from airflow.sdk import Connection
from airflow.sdk._shared.module_loading import import_string
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.types import TaskInstanceKey
from ray_jobs_plugin import RayJobsPlugin

from ray_jobs.hooks import (
    BACKOFF_MAX_S,
    RayJobsError,
    RayJobsHook,
    TransientRetry,
    dashboard_base_url,
    resolve_auth_token,
)
from ray_jobs.links import MLflowRunLink, RayJobLink
from ray_jobs.operators import RayJobOperator
from ray_jobs.submission import (
    MAX_JOB_KEY_LENGTH,
    JobOptions,
    base_submission_id,
    choose_plan,
)
from ray_jobs.triggers import RayJobTrigger, log_fetch_interval, new_log_lines

RUN_ID = "manual__2026-01-05T10:00:00+00:00"

# -- trigger -----------------------------------------------------------------------------------


def test_trigger_serialize_round_trips_through_its_class_path() -> None:
    kwargs_in = {
        "submission_id": "dag__run__task-abc-t1",
        "ray_conn_id": "ray_default",
        "poll_interval": 2.5,
        "result_uri": "s3://bucket/run/stage/result.json",
        "stage": "evaluate",
        "deadline": 1_767_600_000.5,
        "timeout_s": 3600.0,
        "transient_error_budget_s": 120.0,
        "stop_wait_s": 30.0,
        "log_interval_s": 7.0,
        "adopted_at": 1_767_596_400.25,
    }
    trigger = RayJobTrigger(**kwargs_in)  # type: ignore[arg-type]
    classpath, kwargs = trigger.serialize()

    assert classpath == "ray_jobs.triggers.RayJobTrigger"
    # Everything the wait depends on survives a triggerer restart, the deadline above all.
    assert kwargs == kwargs_in
    # The triggerer stores kwargs as JSON and rebuilds the trigger from the class path.
    rebuilt = import_string(classpath)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)


# -- submission ids ----------------------------------------------------------------------------


def test_base_submission_id_is_readable_sanitized_and_pinned() -> None:
    key = base_submission_id("domain_llm", RUN_ID, "train.cpt", -1)

    assert key == "domain_llm__manual__2026-01-05T10-00-00-00-00__train-cpt-" + key[-12:]
    assert re.fullmatch(r"[0-9a-f]{12}", key[-12:])
    assert key == base_submission_id("domain_llm", RUN_ID, "train.cpt", -1)
    assert key == base_submission_id("domain_llm", RUN_ID, "train.cpt", None)


def test_base_submission_id_separates_what_sanitizing_would_merge() -> None:
    keys = {
        base_submission_id("d", "run:1", "t", -1),
        base_submission_id("d", "run-1", "t", -1),
        base_submission_id("d", "run:1", "t", 0),
        base_submission_id("d", "run:1", "t", 1),
        base_submission_id("d__run", "1", "t", -1),
    }
    assert len(keys) == 5
    assert base_submission_id("d", "r", "t", 3).split("-")[0] == "d__r__t__m3"


def test_two_deployments_sharing_a_cluster_never_share_a_run_or_job_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.preflight import DEPLOYMENT_ENV, run_key
    from ray_jobs.submission import DEPLOYMENT_ENV as PLUGIN_DEPLOYMENT_ENV

    assert DEPLOYMENT_ENV == PLUGIN_DEPLOYMENT_ENV == "PIPELINE_DEPLOYMENT"
    scheduled = "scheduled__2026-12-07T03:00:00+00:00"  # both deployments' Monday run
    keys = {}
    for deployment in ("staging", "prod"):
        monkeypatch.setenv(DEPLOYMENT_ENV, deployment)
        keys[deployment] = (
            run_key("domain_llm_retraining", scheduled),
            base_submission_id("domain_llm_retraining", scheduled, "evaluate", -1),
        )
    assert keys["prod"][0].startswith(
        "prod__domain_llm_retraining__scheduled__2026-12-07T03-00-00-00-00-"
    )
    assert keys["staging"][1].startswith("staging__domain_llm_retraining__scheduled__")
    assert keys["prod"][0] != keys["staging"][0] and keys["prod"][1] != keys["staging"][1]
    monkeypatch.delenv(DEPLOYMENT_ENV)
    key = run_key("domain_llm_retraining", scheduled)
    assert re.fullmatch(
        r"domain_llm_retraining__scheduled__2026-12-07T03-00-00-00-00-[0-9a-f]{8}", key
    )
    # Run ids that differ only in characters a folder name cannot hold stay apart.
    alike = ["scheduled__2026-12-07T03-00-00-00-00", "scheduled__2026-12-07T03:00:00~00:00"]
    assert len({key, *(run_key("domain_llm_retraining", r) for r in alike)}) == 3


def test_base_submission_id_is_bounded_for_long_ids() -> None:
    long = base_submission_id("d" * 200, RUN_ID, "t" * 250, 12)
    other = base_submission_id("d" * 200, RUN_ID, "t" * 249 + "x", 12)

    assert len(long) == MAX_JOB_KEY_LENGTH
    assert re.fullmatch(r"[A-Za-z0-9_-]+", long)
    assert long != other  # same truncated prefix, different hash


def test_inputs_fingerprint_changes_the_key_and_stays_readable() -> None:
    plain = base_submission_id("domain_llm", RUN_ID, "evaluate", -1)
    first = base_submission_id("domain_llm", RUN_ID, "evaluate", -1, "3f9a1c0d77e2b4a1")
    again = base_submission_id("domain_llm", RUN_ID, "evaluate", -1, "3f9a1c0d77e2b4a1")
    changed = base_submission_id("domain_llm", RUN_ID, "evaluate", -1, "3f9a1c0d77e2b4a2")

    assert first == again  # unchanged inputs: same key, so the job is reused or re-attached
    assert len({plain, first, changed}) == 3  # changed inputs: a new job
    assert first.startswith("domain_llm__manual__2026-01-05T10-00-00-00-00__evaluate__3f9a1c0d-")
    assert base_submission_id("domain_llm", RUN_ID, "evaluate", -1, "") == plain
    long = base_submission_id("d" * 200, RUN_ID, "t" * 250, 12, "ab" * 40)
    assert len(long) == MAX_JOB_KEY_LENGTH and "__abababab-" in long


# -- job options -------------------------------------------------------------------------------


def test_job_options_parse_the_templated_json_of_the_resolved_config() -> None:
    rendered = json.dumps(
        {
            "timeout_s": 600,
            "entrypoint_num_cpus": 1.0,
            "entrypoint_memory": 2147483648.0,
            "entrypoint_resources": {"driver": 1},
            "runtime_env": {"env_vars": {"A": "1"}},
            "transient_error_budget_s": 300,
            "stop_wait_s": 60,
        }
    )
    options = JobOptions.parse(rendered, "evaluate")

    assert options.entrypoint_memory == 2_147_483_648
    assert isinstance(options.entrypoint_memory, int)  # Ray rejects a float
    assert (options.timeout_s, options.stop_wait_s) == (600, 60)
    assert options.deadline_from(1000.0) == 1600.0
    assert JobOptions.parse("null", "t") == JobOptions.parse(None, "t") == JobOptions()
    assert JobOptions.parse({"timeout_s": None}, "t").deadline_from(1000.0) is None
    with pytest.raises(ValueError, match=r"unknown keys \['timeout'\]; allowed: \['timeout_s'"):
        JobOptions.parse({"timeout": 5}, "evaluate")
    with pytest.raises(ValueError, match=r"job_options of task 'evaluate' is not JSON.*tojson"):
        JobOptions.parse("{'timeout_s': 5}", "evaluate")


# -- log streaming and retry schedule ----------------------------------------------------------


def test_a_long_job_log_is_fetched_less_often() -> None:
    assert log_fetch_interval(15.0, 200_000) == 15.0
    assert log_fetch_interval(15.0, 4_000_000) == 60.0  # four times the text, a quarter the rate
    assert log_fetch_interval(15.0, 500_000_000) == 300.0
    assert log_fetch_interval(600.0, 10) == 600.0  # never sooner than asked


def test_new_log_lines_keeps_an_offset_holds_partial_lines_and_rate_limits() -> None:
    log = "step 1 loss 2.0\nstep 2 loss 1.9\nstep 3 lo"
    first = new_log_lines(log, 0, max_lines=50, final=False)
    assert (first.lines, first.skipped, first.offset) == (
        ["step 1 loss 2.0", "step 2 loss 1.9"], 0, 32
    )  # fmt: skip
    log += "ss 1.8\n" + "".join(f"step {i}\n" for i in range(4, 104)) + "committed"
    second = new_log_lines(log, first.offset, max_lines=50, final=False)
    assert second.skipped == 51 and len(second.lines) == 50  # step 3 .. 103 is 101 lines
    assert second.lines[-1] == "step 103"
    final = new_log_lines(log, second.offset, max_lines=50, final=True)
    assert (final.lines, final.offset) == (["committed"], len(log))
    assert new_log_lines(log, final.offset, max_lines=50, final=True).lines == []
    assert new_log_lines("fresh\n", 500, max_lines=50, final=False).lines == ["fresh"]


def test_transient_retry_backs_off_exponentially_capped_within_the_budget() -> None:
    schedule = TransientRetry(budget_s=10_000)
    delays = [schedule.next_delay() for _ in range(8)]
    assert delays == [1, 2, 4, 8, 16, BACKOFF_MAX_S, BACKOFF_MAX_S, BACKOFF_MAX_S]
    assert TransientRetry(budget_s=0).next_delay() is None
    # The budget is wall-clock time since the first failure: never sleep past it.
    one_second_in = TransientRetry(budget_s=2.5, started=time.monotonic() - 1.0, attempts=1)
    assert 1.4 < one_second_in.next_delay() <= 1.5  # type: ignore[operator]
    spent = TransientRetry(budget_s=2.5, started=time.monotonic() - 2.6, attempts=2)
    assert spent.next_delay() is None


# -- re-attach decision ------------------------------------------------------------------------


def _job(sid: str, status: str, start: int | None, key: str | None = "k") -> dict[str, Any]:
    metadata = None if key is None else {"airflow_job_key": key}
    return {"submission_id": sid, "status": status, "start_time": start, "metadata": metadata}


@pytest.mark.parametrize(
    ("jobs", "action", "picked"),
    [
        ([], "submit", None),
        (
            [_job("other", "RUNNING", 5, key="x"), _job("bare", "RUNNING", 6, key=None)],
            "submit",
            None,
        ),
        ([_job("t1", "FAILED", 1), _job("t2", "RUNNING", 2)], "attach", "t2"),
        ([_job("t1", "FAILED", 1), _job("t2", "PENDING", None)], "attach", "t2"),
        ([_job("t1", "FAILED", 1), _job("t2", "SUCCEEDED", 2)], "reuse", "t2"),
        ([_job("t1", "SUCCEEDED", 1), _job("t2", "FAILED", 2)], "submit", "t2"),
        ([_job("t1", "STOPPED", 3)], "submit", "t1"),
    ],
)
def test_choose_plan_follows_the_newest_job_of_the_key(
    jobs: list[dict[str, Any]], action: str, picked: str | None
) -> None:
    plan = choose_plan(jobs, "k")

    assert plan.action == action
    assert (plan.job or {}).get("submission_id") == picked


# -- token lookup and base URL -----------------------------------------------------------------


@pytest.fixture
def clean_token_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No token in the environment; HOME is a temp folder; returns that HOME."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _token_file(path: Path, value: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return str(path)


def test_token_lookup_order(
    clean_token_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    extra = {"auth_token_path": _token_file(tmp_path / "extra_token", "from-extra")}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", _token_file(tmp_path / "env_token", "from-env-path"))
    _token_file(clean_token_env / ".ray" / "auth_token", "from-home")

    found = []
    found.append(resolve_auth_token("from-password", extra))
    found.append(resolve_auth_token(None, extra))
    found.append(resolve_auth_token(None, {}))
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    found.append(resolve_auth_token(None, {}))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    found.append(resolve_auth_token(None, {}))
    (clean_token_env / ".ray" / "auth_token").unlink()
    found.append(resolve_auth_token(None, {}))

    values = [token.value if token else None for token in found]
    assert values == ["from-password", "from-extra", "from-env", "from-env-path", "from-home", None]
    # The source is printable, the value is not part of the repr.
    assert "extra_token" in found[1].source  # type: ignore[union-attr]
    assert "from-extra" not in repr(found[1])


def test_configured_token_file_that_is_missing_or_empty_is_an_error(
    clean_token_env: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RayJobsError, match=re.escape(str(missing))):
        resolve_auth_token(None, {"auth_token_path": str(missing)})
    empty = _token_file(tmp_path / "empty", "")
    with pytest.raises(RayJobsError, match="is empty"):
        resolve_auth_token(None, {"auth_token_path": empty})


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        (Connection(conn_id="r", conn_type="http", host="127.0.0.1", port=8265), "http://127.0.0.1:8265"),
        (Connection(conn_id="r", conn_type="ray", host="head", port=8265), "http://head:8265"),
        (Connection(conn_id="r", conn_type="ray", host="head", schema="https"), "https://head"),
        (Connection(conn_id="r", conn_type="https", host="ray.example.com"), "https://ray.example.com"),
        (Connection(conn_id="r", conn_type="https", host="ray.example.com", schema="ray"), "https://ray.example.com/ray"),
        (Connection(conn_id="r", conn_type="ray", host="head", schema="dash/board"), "http://head/dash/board"),
        (Connection(conn_id="r", conn_type="http", host="https://ray.example.com/ray/"), "https://ray.example.com/ray"),
        (Connection(conn_id="r", conn_type="http", host="http://head", port=8266), "http://head:8266"),
        (Connection(conn_id="r", conn_type="http", host="http://head:8265", port=9999), "http://head:8265"),
    ],
)  # fmt: skip
def test_dashboard_base_url_from_connection(conn: Connection, expected: str) -> None:
    assert dashboard_base_url(conn) == expected


def test_hook_reads_connection_from_env_uri(
    clean_token_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_path = _token_file(tmp_path / "tok", "secret-token-123")
    monkeypatch.setenv("AIRFLOW_CONN_RAY_UNIT", f"http://head:8265?auth_token_path={token_path}")
    hook = RayJobsHook("ray_unit")

    assert hook.dashboard_job_url("job-1") == "http://head:8265/#/jobs/job-1"
    target = hook._get_target()
    assert target.headers == {"Authorization": "Bearer secret-token-123"}
    assert "secret-token-123" not in repr(target)


def test_a_dashboard_behind_an_ingress_prefix_keeps_scheme_and_path_and_links_go_public(
    clean_token_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = "https://ray.example.com/clusters/prod"
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_INGRESS",
        f"https://ray-ingress.internal/ray?public_url={quote(public, safe='')}",  # URI-encoded
    )
    hook = RayJobsHook("ray_ingress")
    assert hook._get_target().base_url == "https://ray-ingress.internal/ray"
    assert hook.dashboard_job_url("job-1") == f"{public}/#/jobs/job-1"
    # Without public_url, links are the API's address; a non-http scheme fails at once.
    monkeypatch.setenv("AIRFLOW_CONN_RAY_PLAIN", "http://ray-head:8265")
    assert RayJobsHook("ray_plain").dashboard_job_url("j") == "http://ray-head:8265/#/jobs/j"
    with pytest.raises(RayJobsError, match="over http or https, not 'ray'"):
        dashboard_base_url(Connection(conn_id="r", conn_type="http", host="ray://head:10001"))


# -- links and plugin --------------------------------------------------------------------------


class _FakeSupervisor:
    """Answers the task runner's GetXCom requests the way the supervisor would."""

    def __init__(self, xcoms: dict[str, Any]) -> None:
        self.xcoms = xcoms
        self.asked: list[Any] = []

    def send(self, msg: Any) -> Any:
        from airflow.sdk.execution_time.comms import XComResult

        self.asked.append(msg)
        return XComResult(key=msg.key, value=self.xcoms.get(msg.key))


def test_links_read_the_urls_the_operator_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.execution_time import task_runner

    supervisor = _FakeSupervisor({"ray_dashboard_url": "http://head:8265/#/jobs/j-t1"})
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", supervisor, raising=False)
    ti_key = TaskInstanceKey(dag_id="d", task_id="t", run_id="r", try_number=2, map_index=3)
    operator = RayJobOperator(task_id="t", entrypoint="true")

    assert RayJobLink().get_link(operator, ti_key=ti_key) == "http://head:8265/#/jobs/j-t1"
    assert MLflowRunLink().get_link(operator, ti_key=ti_key) == ""
    asked = [(m.key, m.dag_id, m.task_id, m.run_id, m.map_index) for m in supervisor.asked]
    assert asked == [("ray_dashboard_url", "d", "t", "r", 3), ("mlflow_run_url", "d", "t", "r", 3)]


def test_plugin_registers_the_operator_links() -> None:
    from airflow.plugins_manager import is_valid_plugin

    assert is_valid_plugin(RayJobsPlugin)
    assert RayJobsPlugin.name == "ray_jobs"
    names = sorted(link.name for link in RayJobsPlugin.operator_extra_links)
    assert names == sorted(link.name for link in RayJobOperator.operator_extra_links)
    assert names == ["MLflow run", "Ray job", "Report"]


# -- execute_complete without Ray --------------------------------------------------------------


@dataclass
class FakeTaskInstance:
    """The part of the runtime task instance the operator uses."""

    dag_id: str = "d"
    run_id: str = RUN_ID
    task_id: str = "t"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def _event(status: str, result_uri: str | None = None) -> dict[str, Any]:
    return {
        "status": status,
        "submission_id": "j-t1",
        "message": "Job finished.",
        "result_uri": result_uri,
        "dashboard_url": "http://head:8265/#/jobs/j-t1",
        "stage": "t",
        "was_being_stopped": False,
    }


def test_execute_complete_returns_the_stage_result(tmp_path: Path) -> None:
    result_uri = tmp_path / "result.json"
    result_uri.write_text(json.dumps({"stage": "evaluate", "mlflow_run_url": "http://mlflow/r/1"}))
    ti = FakeTaskInstance()
    operator = RayJobOperator(task_id="t", entrypoint="true", ray_conn_id="ray_not_needed")

    out = operator.execute_complete({"ti": ti}, _event("SUCCEEDED", str(result_uri)))  # type: ignore[typeddict-item]

    assert out == {"stage": "evaluate", "mlflow_run_url": "http://mlflow/r/1"}
    assert ti.xcoms == {"mlflow_run_url": "http://mlflow/r/1"}
    bare = operator.execute_complete({"ti": ti}, _event("SUCCEEDED"))  # type: ignore[typeddict-item]
    assert bare == {"submission_id": "j-t1", "status": "SUCCEEDED"}


def test_execute_complete_errors_name_the_job_and_the_file(tmp_path: Path) -> None:
    operator = RayJobOperator(task_id="t", entrypoint="true", ray_conn_id="ray_not_needed")
    context: Any = {"ti": FakeTaskInstance()}

    missing = str(tmp_path / "result.json")
    with pytest.raises(AirflowException, match=f"j-t1 succeeded but wrote no result at {missing}"):
        operator.execute_complete(context, _event("SUCCEEDED", missing))
    # MISSING: the job is gone, so there are no logs to fetch and Ray is not asked.
    with pytest.raises(
        AirflowException, match=re.escape("j-t1 ended MISSING: Job finished.\nDashboard: http")
    ):
        operator.execute_complete(context, _event("MISSING"))


def test_execute_complete_logs_the_summary_and_skips_with_the_gate_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    result_uri = tmp_path / "result.json"
    summary = ["gate perplexity 12.1 <= 15.0 pass", "gate judge 0.41 >= 0.5 FAIL", "decision: keep"]
    result = {
        "stage": "promote",
        "mlflow_run_url": "http://mlflow/r/7",
        "summary": summary,
        "skip_reason": "promotion refused: gate judge 0.41 < 0.5",
    }
    result_uri.write_text(json.dumps(result))
    ti = FakeTaskInstance()
    operator = RayJobOperator(task_id="promote", entrypoint="true", ray_conn_id="ray_not_needed")

    with pytest.raises(AirflowSkipException) as skipped:
        operator.execute_complete({"ti": ti}, _event("SUCCEEDED", str(result_uri)))  # type: ignore[typeddict-item]

    assert str(skipped.value) == "promotion refused: gate judge 0.41 < 0.5"
    assert ti.xcoms == {"mlflow_run_url": "http://mlflow/r/7"}  # the child run, even when skipped
    # The task SDK logs through structlog to stdout: one line each, in this order, at the end.
    logged = [line for line in capsys.readouterr().out.splitlines() if "operators.py" in line]
    expected = ["stage summary:", *(f"  {line}" for line in summary)]
    assert len(logged) == 4
    assert all(want in got for want, got in zip(expected, logged, strict=True))


def test_timeout_and_missing_failures_say_what_happened() -> None:
    operator = RayJobOperator(task_id="t", entrypoint="true", ray_conn_id="ray_not_needed")
    context: Any = {"ti": FakeTaskInstance()}
    missing = {**_event("MISSING"), "message": "Ray job j-t1 does not exist on the Ray head"}
    with pytest.raises(AirflowException, match=r"(?s)ended MISSING.*dead link: that head"):
        operator.execute_complete(context, missing)
