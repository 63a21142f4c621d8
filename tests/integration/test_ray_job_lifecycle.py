"""Lifecycle of a stage's Ray job against a real token-auth Ray head: deadline, kill, outage,
clear after stop, inputs fingerprint, log streaming and driver resources.

Triggers run through their async ``run()`` / ``on_kill()`` with asyncio, as Airflow's own
trigger tests do; the dashboard outage is a real one (a TCP proxy in front of the dashboard
that stops listening for a few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from pipeline.devstack.host import free_port
from pipeline.devstack.ray_cluster import RayHead
from ray_jobs.hooks import RayJobsHook, RayJobStillRunningError
from ray_jobs.operators import RayJobOperator
from ray_jobs.submission import JobOptions, base_submission_id, plan_submission, submit_new_job
from ray_jobs.triggers import MAX_LOG_LINES_PER_FETCH, RayJobTrigger, first_event
from tests.task_instance import FakeTaskInstance

DAG_ID = FakeTaskInstance.dag_id

pytestmark = pytest.mark.integration

PY = shlex.quote(sys.executable)
HELLO = f"{PY} -c \"print('hello')\""
# Like a trainer that checkpoints on SIGTERM: Ray then waits its 3 s grace before SIGKILL, so
# the job stays listed RUNNING for seconds after it was asked to stop.
STUBBORN = (
    f"{PY} -u -c \"import signal, time; print('step 1 loss 2.0'); "
    "signal.signal(signal.SIGTERM, lambda *a: print('SIGTERM: saving', flush=True)); "
    'time.sleep(60)"'
)
SLEEPER = f"{PY} -u -c \"import time; print('step 1 loss 2.0'); time.sleep(60)\""


@pytest.fixture
def hook(ray_head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayJobsHook:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_LIFE", ray_head.airflow_conn_uri())
    return RayJobsHook("ray_life", transient_error_budget_s=10)


def _run_id() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


def _wait_status(hook: RayJobsHook, sid: str, statuses: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = hook.get_job(sid)
        assert job is not None
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {sid} not in {statuses} after {timeout} s")


def _event(trigger: RayJobTrigger, timeout: float = 60) -> dict[str, Any]:
    return asyncio.run(asyncio.wait_for(first_event(trigger), timeout))


def _deferred(operator: RayJobOperator, ti: FakeTaskInstance) -> RayJobTrigger:
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayJobTrigger)
    return trigger


# -- deadline ----------------------------------------------------------------------------------


def test_deadline_from_first_submission_stops_the_job_and_fails_naming_stage_and_timeout(
    hook: RayJobsHook,
) -> None:
    run_id = _run_id()
    key = base_submission_id(DAG_ID, run_id, "stage", -1, "fp")
    first = submit_new_job(hook, job_key=key, try_number=1, entrypoint=SLEEPER, metadata={})
    submitted = _wait_status(hook, first, {"RUNNING"})

    # A later try re-attaches; its deadline still counts from the job's first submission.
    operator = RayJobOperator(
        task_id="stage", entrypoint=SLEEPER, ray_conn_id="ray_life", inputs_fingerprint="fp",
        job_options={"timeout_s": 4, "stop_wait_s": 20}, poll_interval=0.3,
    )  # fmt: skip
    trigger = _deferred(operator, FakeTaskInstance(run_id=run_id, try_number=2))
    assert trigger.submission_id == first
    assert trigger.deadline == pytest.approx(submitted["start_time"] / 1000 + 4, abs=0.01)

    event = _event(trigger)

    job = hook.get_job(first)
    assert job is not None and job["status"] == "STOPPED"  # stopped, not deleted
    assert event["status"] == "TIMEOUT"
    assert f"Ray job {first} was stopped and ended STOPPED" in event["message"]
    with pytest.raises(AirflowException) as failed:
        operator.execute_complete({"ti": FakeTaskInstance(run_id=run_id)}, event)  # type: ignore[typeddict-item]
    assert str(failed.value).startswith(
        f"stage 'stage' timed out; Ray job {first} ended TIMEOUT: stage 'stage' ran past 4 s "
        "(job_options.timeout_s, counted from the job's first submission"
    )


def test_plan_stops_an_active_job_past_its_deadline_before_a_new_submission(
    hook: RayJobsHook,
) -> None:
    key = base_submission_id(DAG_ID, _run_id(), "stage", -1)
    first = submit_new_job(hook, job_key=key, try_number=1, entrypoint=STUBBORN, metadata={})
    _wait_status(hook, first, {"RUNNING"})

    started = time.monotonic()
    plan = plan_submission(hook, key, JobOptions(timeout_s=0.5, stop_wait_s=20))

    assert plan.action == "submit"
    assert plan.job is not None and plan.job["status"] == "STOPPED"
    assert time.monotonic() - started >= 2.5  # it waited out Ray's SIGTERM grace of 3 s


# -- kill --------------------------------------------------------------------------------------


def test_trigger_on_kill_returns_once_the_job_is_stopped(hook: RayJobsHook) -> None:
    sid = submit_new_job(
        hook, job_key=base_submission_id(DAG_ID, _run_id(), "stage", -1),
        try_number=1, entrypoint=STUBBORN, metadata={},
    )  # fmt: skip
    _wait_status(hook, sid, {"RUNNING"})

    trigger = RayJobTrigger(submission_id=sid, ray_conn_id="ray_life", stop_wait_s=20)
    asyncio.run(trigger.on_kill())

    job = hook.get_job(sid)  # no waiting here: on_kill waited for Ray to say so
    assert job is not None and job["status"] == "STOPPED"


class _TaskStates:
    """Stands in for the triggerer's supervisor: answers GetTaskStates with one state."""

    def __init__(self, run_id: str, task_id: str, state: str) -> None:
        self.states = {run_id: {task_id: state}}
        self.asked: list[Any] = []

    def send(self, msg: Any) -> Any:
        from airflow.sdk.execution_time.comms import TaskStatesResult

        self.asked.append(type(msg).__name__)
        return TaskStatesResult(task_states=self.states)


def test_a_trigger_moved_to_another_triggerer_leaves_the_job_running(
    hook: RayJobsHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow cancels a reassigned trigger like a user's kill; the task is still deferred
    then, and the job must keep running for the triggerer that took it over."""
    from types import SimpleNamespace

    from airflow.sdk.execution_time import task_runner

    run_id = _run_id()
    sid = submit_new_job(
        hook, job_key=base_submission_id(DAG_ID, run_id, "stage", -1),
        try_number=1, entrypoint=SLEEPER, metadata={},
    )  # fmt: skip
    _wait_status(hook, sid, {"RUNNING"})
    trigger = RayJobTrigger(submission_id=sid, ray_conn_id="ray_life", stop_wait_s=20)
    trigger.task_instance = SimpleNamespace(  # type: ignore[assignment]
        dag_id=DAG_ID, task_id="stage", run_id=run_id, map_index=-1
    )
    supervisor = _TaskStates(run_id, "stage", "deferred")
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", supervisor, raising=False)
    asyncio.run(trigger.on_kill())
    assert supervisor.asked == ["GetTaskStates"]
    job = hook.get_job(sid)
    assert job is not None and job["status"] == "RUNNING"

    # The user marked it failed: the task is no longer deferred, and the job stops.
    supervisor.states = {run_id: {"stage": "failed"}}
    asyncio.run(trigger.on_kill())
    job = hook.get_job(sid)
    assert job is not None and job["status"] == "STOPPED"


def test_operator_on_kill_stops_the_job_it_waits_for_in_the_worker(hook: RayJobsHook) -> None:
    operator = RayJobOperator(
        task_id="stage", entrypoint=SLEEPER, ray_conn_id="ray_life", deferrable=False,
        poll_interval=0.3, job_options={"stop_wait_s": 20},
    )  # fmt: skip
    ti = FakeTaskInstance(run_id=_run_id())
    failures: list[BaseException] = []

    def execute() -> None:
        try:
            operator.execute({"ti": ti})  # type: ignore[typeddict-item]
        except AirflowException as err:
            failures.append(err)

    worker = threading.Thread(target=execute)
    worker.start()
    deadline = time.monotonic() + 30
    while "ray_submission_id" not in ti.xcoms and time.monotonic() < deadline:
        time.sleep(0.1)
    sid = ti.xcoms["ray_submission_id"]
    _wait_status(hook, sid, {"RUNNING"})

    operator.on_kill()

    job = hook.get_job(sid)
    assert job is not None and job["status"] == "STOPPED"
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert len(failures) == 1 and f"Ray job {sid} ended STOPPED" in str(failures[0])


# -- transient errors --------------------------------------------------------------------------


class DashboardProxy:
    """A TCP proxy in front of the dashboard that can stop listening, as a restarting head or
    a flapping network does (connection refused), then come back on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._open.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self._open.discard(writer)


def test_dashboard_outage_is_ridden_out_within_the_budget_and_fails_past_it(
    hook: RayJobsHook, ray_head: RayHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = hook.submit_job(
        entrypoint=f"{PY} -c \"import time; time.sleep(10); print('done')\"",
        submission_id=f"outage-{uuid.uuid4().hex[:8]}",
    )
    _wait_status(hook, sid, {"RUNNING"})
    dashboard_port = int(ray_head.dashboard_url.rsplit(":", 1)[1])
    patient, impatient = DashboardProxy(dashboard_port), DashboardProxy(dashboard_port)
    for name, proxy in (("RAY_PATIENT", patient), ("RAY_IMPATIENT", impatient)):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{name}",
            f"http://127.0.0.1:{proxy.port}?auth_token_path={ray_head.token_path}",
        )

    async def outage() -> tuple[dict[str, Any], dict[str, Any], float]:
        await patient.start()
        await impatient.start()
        events = [
            asyncio.create_task(first_event(RayJobTrigger(
                submission_id=sid, ray_conn_id=conn, poll_interval=0.5,
                transient_error_budget_s=budget, log_interval_s=60,
            )))
            for conn, budget in (("ray_patient", 30.0), ("ray_impatient", 2.0))
        ]  # fmt: skip
        await asyncio.sleep(1.5)  # both are polling through their proxies now
        await patient.stop()
        await impatient.stop()
        down = time.monotonic()
        await asyncio.sleep(6)
        await patient.start()
        await impatient.start()
        ok, failed = await asyncio.wait_for(asyncio.gather(*events), 60)
        await patient.stop()
        await impatient.stop()
        return ok, failed, time.monotonic() - down

    ok, failed, since_outage = asyncio.run(outage())

    assert ok["status"] == "SUCCEEDED"  # it kept waiting through 6 s of connection refused
    assert since_outage > 6
    assert failed["status"] == "ERROR"  # the same outage outlasted a 2 s budget
    assert "cannot reach the Ray Jobs API" in failed["message"]
    assert "within transient_error_budget_s=2)" in failed["message"]


# -- clear after stop, inputs fingerprint ------------------------------------------------------


def test_clear_after_stop_submits_a_new_job_only_once_the_old_one_is_stopped(
    hook: RayJobsHook,
) -> None:
    run_id = _run_id()
    key = base_submission_id(DAG_ID, run_id, "stage", -1, "fp")
    old = submit_new_job(hook, job_key=key, try_number=1, entrypoint=STUBBORN, metadata={})
    _wait_status(hook, old, {"RUNNING"})
    # The kill of try 1 asked Ray to stop; the job stays listed RUNNING for its grace period.
    assert hook.stop_job(old) is True
    assert hook.get_job(old)["status"] == "RUNNING"  # type: ignore[index]

    operator = RayJobOperator(
        task_id="stage", entrypoint=HELLO, ray_conn_id="ray_life", inputs_fingerprint="fp",
        poll_interval=0.3, job_options={"stop_wait_s": 20},
    )  # fmt: skip
    ti = FakeTaskInstance(run_id=run_id, try_number=2)
    adopted = _deferred(operator, ti)
    assert (adopted.submission_id, adopted.adopted_at is not None) == (old, True)
    stopped = _event(adopted)
    assert (stopped["status"], stopped["was_being_stopped"]) == ("STOPPED", True)

    # Resumed, the task does not fail on STOPPED: it submits a new job, now that the old ended.
    with pytest.raises(TaskDeferred) as again:
        RayJobOperator(**operator_kwargs(operator)).execute_complete({"ti": ti}, stopped)  # type: ignore[typeddict-item]
    new = again.value.trigger
    assert isinstance(new, RayJobTrigger) and new.submission_id == f"{key}-t2"
    old_job, new_job = hook.get_job(old), hook.get_job(new.submission_id)
    assert old_job is not None and new_job is not None
    assert old_job["status"] == "STOPPED" and old_job["end_time"] <= new_job["start_time"]
    assert _event(new)["status"] == "SUCCEEDED"


def operator_kwargs(operator: RayJobOperator) -> dict[str, Any]:
    """Constructor args of an operator, to build the fresh instance Airflow resumes on."""
    names = ("task_id", "entrypoint", "ray_conn_id", "result_uri", "job_options")
    more = ("inputs_fingerprint", "mlflow_run_url", "poll_interval", "log_interval_s")
    return {name: getattr(operator, name) for name in names + more}


def _writes_result(path: Path, marker: str) -> str:
    code = (
        "import json, pathlib; "
        f"pathlib.Path({str(path)!r}).write_text(json.dumps("
        f"{{'stage': 'demo', 'marker': {marker!r}, 'mlflow_run_url': 'http://mlflow/r/child'}}))"
    )
    return f"{PY} -c {shlex.quote(code)}"


def test_unchanged_inputs_reuse_the_result_changed_inputs_run_a_new_job(
    hook: RayJobsHook, tmp_path: Path
) -> None:
    run_id, result = _run_id(), tmp_path / "result.json"

    def operator(fingerprint: str) -> RayJobOperator:
        return RayJobOperator(
            task_id="stage", entrypoint=_writes_result(result, fingerprint),
            ray_conn_id="ray_life", result_uri=str(result), inputs_fingerprint=fingerprint,
            mlflow_run_url="http://mlflow/r/parent", poll_interval=0.3,
        )  # fmt: skip

    ti = FakeTaskInstance(run_id=run_id)
    trigger = _deferred(operator("inputs-a"), ti)
    assert ti.xcoms["mlflow_run_url"] == "http://mlflow/r/parent"  # linked while it runs
    done = operator("inputs-a").execute_complete({"ti": ti}, _event(trigger))  # type: ignore[typeddict-item]
    assert done["marker"] == "inputs-a"
    assert ti.xcoms["mlflow_run_url"] == "http://mlflow/r/child"

    cleared = FakeTaskInstance(run_id=run_id, try_number=2)
    jobs_before = len(hook.list_jobs())
    assert operator("inputs-a").execute({"ti": cleared}) == done  # type: ignore[typeddict-item]
    assert len(hook.list_jobs()) == jobs_before  # reused, nothing submitted
    assert cleared.xcoms["ray_submission_id"] == trigger.submission_id

    changed = FakeTaskInstance(run_id=run_id, try_number=3)
    rerun = _deferred(operator("inputs-b"), changed)
    assert rerun.submission_id != trigger.submission_id
    assert (
        rerun.submission_id == base_submission_id(DAG_ID, run_id, "stage", -1, "inputs-b") + "-t3"
    )
    rerun_result = operator("inputs-b").execute_complete({"ti": changed}, _event(rerun))  # type: ignore[typeddict-item]
    assert rerun_result["marker"] == "inputs-b"


# -- progress in the task log ------------------------------------------------------------------


def test_trigger_streams_new_log_lines_rate_limited_and_the_final_tail(
    hook: RayJobsHook, capsys: pytest.CaptureFixture[str]
) -> None:
    # 120 step lines at once, a pause, then a last step and an unterminated last line, which
    # only the final fetch after the terminal status may print.
    code = (
        "import time\n"
        "for i in range(1, 121): print(f'step {i} loss {3 - i / 100:.2f} tok/s 900', flush=True)\n"
        "time.sleep(3)\n"
        "print('step 121 loss 1.79 tok/s 900')\n"
        "print('committed', end='')"
    )
    sid = hook.submit_job(
        entrypoint=f"{PY} -c {shlex.quote(code)}", submission_id=f"logs-{uuid.uuid4().hex[:8]}"
    )
    trigger = RayJobTrigger(
        submission_id=sid, ray_conn_id="ray_life", poll_interval=0.3, log_interval_s=0.5
    )
    capsys.readouterr()

    assert _event(trigger)["status"] == "SUCCEEDED"

    lines = [line for line in capsys.readouterr().out.splitlines() if "RayJobTrigger" in line]
    ended = next(i for i, line in enumerate(lines) if f"Ray job {sid} is SUCCEEDED" in line)
    running, after = _job_lines(lines[:ended]), _job_lines(lines[ended:])
    steps_running, steps = _steps(running), _steps(running + after)
    skipped = [int(m.group(1)) for line in running if (m := re.match(r"\.\.\. (\d+) lines", line))]

    assert 120 in steps_running  # the steps showed while the job ran
    assert steps == sorted(set(steps)) and steps[-1] == 121  # in order, none twice
    # At most 50 lines per fetch: 120 lines in two fetches at most leave >= 20 counted only.
    assert skipped and sum(skipped) >= 120 - 2 * MAX_LOG_LINES_PER_FETCH
    shown = [line for line in running + after if not re.match(r"\.\.\. \d+ lines", line)]
    whole = hook.get_job_logs(sid).splitlines()  # Ray adds its own lines before the job's
    assert len(shown) + sum(skipped) == len(whole), (shown, skipped)  # shown once or counted
    assert after[-1] == "committed" and "committed" not in running  # the final tail


def _steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+) ", line))]


def _job_lines(logged: list[str]) -> list[str]:
    """The job's own lines among the trigger's log lines."""
    # Each is "<time> [info] [ray job] <line>   [<logger>] loc=...": keep <line>.
    job = re.compile(r"\[ray job\] (.*?)\s+\[ray_jobs\.triggers\.RayJobTrigger\]")
    return [m.group(1) for line in logged if (m := job.search(line))]


# -- driver placement --------------------------------------------------------------------------


def test_entrypoint_resources_reach_ray(hook: RayJobsHook) -> None:
    options = JobOptions(
        entrypoint_num_cpus=0.5,
        entrypoint_memory=64 * 2**20,
        entrypoint_resources={"no_such_resource": 1},
        runtime_env={"env_vars": {"STAGE": "evaluate"}},
    )
    sid = submit_new_job(
        hook, job_key=base_submission_id(DAG_ID, _run_id(), "stage", -1),
        try_number=1, entrypoint=HELLO, metadata={}, options=options,
    )  # fmt: skip
    time.sleep(3)

    job = hook.get_job(sid)
    assert job is not None
    assert job["status"] == "PENDING"  # no node has the resource: the driver cannot be placed
    # (The Jobs API does not echo entrypoint_* back; the unplaceable driver is the proof.)
    assert "waiting for resources" in job["message"], job["message"]
    assert job["runtime_env"]["env_vars"] == {"STAGE": "evaluate"}
    # Ray queues the stop of a driver it never placed; the wait for STOPPED says so plainly.
    with pytest.raises(RayJobStillRunningError, match="RAY_JOB_START_TIMEOUT_SECONDS"):
        hook.stop_and_wait(sid, 1)
