"""Which Ray job a task instance runs: its job key, its options, and submit/re-attach/reuse.

Every try of a task instance shares one *job key* derived from (dag_id, run_id, task_id,
map_index, inputs fingerprint) and stored in the Ray job's metadata. A try looks the key up
first: a worker that died while its job kept running re-attaches to it instead of starting a
second training run, a job that already succeeded is not run again, and a cleared task whose
inputs changed gets a new key, hence a new job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

from ray_jobs.hooks import ACTIVE_STATUSES, RayJobsHook, RaySubmissionExistsError
from ray_jobs.triggers import DEFAULT_STOP_WAIT_S

log = logging.getLogger(__name__)

JOB_KEY_METADATA_FIELD = "airflow_job_key"
SUBMIT_NONCE_METADATA_FIELD = "airflow_submit_nonce"
DEPLOYMENT_ENV = "PIPELINE_DEPLOYMENT"
"""Names this Airflow deployment where several share one Ray cluster and artifact root
(``pipeline.preflight.run_key`` reads it too)."""
MAX_JOB_KEY_LENGTH = 96
"""Room is left for the ``-t<try>-<suffix>`` tail; Ray names driver log files after the id."""
_NOT_ID_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def base_submission_id(
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int | None,
    inputs_fingerprint: str | None = None,
) -> str:
    """The job key of one task instance and inputs, shared by all its tries.

    Readable (``<dag>__<run>__<task>[__m<i>][__<fingerprint[:8]>]`` reduced to
    ``[A-Za-z0-9_-]``, cut to fit) and ended by a hash of the exact, unsanitized tuple:
    sanitizing and cutting can make two different task instances look alike, and a collision
    would re-attach to another run's job. Without a fingerprint the key is the one of the
    task instance alone.

    Returns:
        At most ``MAX_JOB_KEY_LENGTH`` characters; the same inputs always give the same key.
    """
    index = -1 if map_index is None else map_index
    # Two Airflow deployments (staging, production) on one Ray cluster name their scheduled
    # runs alike: their deployment name keeps them from adopting each other's jobs.
    deployment = [name] if (name := os.environ.get(DEPLOYMENT_ENV, "")) else []
    parts = [*deployment, dag_id, run_id, task_id] + ([f"m{index}"] if index >= 0 else [])
    readable = "__".join(_NOT_ID_SAFE.sub("-", part).strip("-") for part in parts)
    exact: list[Any] = [*deployment, dag_id, run_id, task_id, index]
    inputs = ""
    if inputs_fingerprint:
        exact.append(inputs_fingerprint)
        inputs = "__" + _NOT_ID_SAFE.sub("-", inputs_fingerprint[:8])
    digest = hashlib.sha256(json.dumps(exact).encode()).hexdigest()[:12]
    room = MAX_JOB_KEY_LENGTH - len(digest) - 1 - len(inputs)
    return f"{readable[:room]}{inputs}-{digest}"


@dataclass(frozen=True)
class JobOptions:
    """How a stage's Ray job is placed and watched; the resolved config's ``jobs[<stage>]``."""

    timeout_s: float | None = None
    """Deadline from the job's first submission; None: no deadline."""
    entrypoint_num_cpus: float | None = None
    entrypoint_memory: int | None = None
    """Bytes reserved for the driver."""
    entrypoint_resources: dict[str, float] | None = None
    entrypoint_label_selector: dict[str, str] | None = None
    runtime_env: dict[str, Any] | None = None
    transient_error_budget_s: float | None = None
    """None: the connection extra ``transient_error_budget_s``, else the hook's default."""
    stop_wait_s: float = DEFAULT_STOP_WAIT_S

    @classmethod
    def parse(cls, raw: dict[str, Any] | str | None, task_id: str) -> JobOptions:
        """Options from the operator's ``job_options`` (a dict, or its JSON once templated).

        Raises:
            ValueError: not JSON, not an object, or an unknown key (the message lists the
                allowed ones); null values keep the defaults.
        """
        if raw is None or raw == "":
            return cls()
        where = f"job_options of task {task_id!r}"
        if isinstance(raw, str):
            text = raw
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where} is not JSON ({err}): {text[:200]!r}; template it with `| tojson`"
                ) from err
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
        allowed = [field.name for field in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: {allowed}")
        values = {key: value for key, value in raw.items() if value is not None}
        if "entrypoint_memory" in values:
            values["entrypoint_memory"] = int(values["entrypoint_memory"])  # Ray wants an int
        return cls(**values)

    def deadline_from(self, submitted_at: float) -> float | None:
        """Epoch seconds when a job submitted at ``submitted_at`` must be stopped."""
        return None if self.timeout_s is None else submitted_at + self.timeout_s


@dataclass(frozen=True)
class SubmissionPlan:
    """What to do about the Ray job of a task instance, given the jobs already on the cluster."""

    action: Literal["attach", "reuse", "submit"]
    """attach: wait for a PENDING/RUNNING job; reuse: it SUCCEEDED, read its result;
    submit: start a new job (none yet, or the newest FAILED, was STOPPED or timed out)."""
    job: dict[str, Any] | None = None
    """The newest earlier job with this key, None when there is none."""


def choose_plan(jobs: Iterable[dict[str, Any]], job_key: str) -> SubmissionPlan:
    """Decide from the cluster's job list (``RayJobsHook.list_jobs``) alone; no I/O."""
    mine = [job for job in jobs if _job_key_of(job) == job_key]
    if not mine:
        return SubmissionPlan("submit")
    # start_time is the submission time; a job without one is the most recent.
    newest = max(mine, key=lambda job: job.get("start_time") or float("inf"))
    if newest["status"] in ACTIVE_STATUSES:
        return SubmissionPlan("attach", newest)
    if newest["status"] == "SUCCEEDED":
        return SubmissionPlan("reuse", newest)
    return SubmissionPlan("submit", newest)


def _job_key_of(job: dict[str, Any]) -> str | None:
    # Jobs submitted without metadata (by hand, by other tools) list it as null.
    key: str | None = (job.get("metadata") or {}).get(JOB_KEY_METADATA_FIELD)
    return key


def submitted_at(job: dict[str, Any]) -> float:
    """Epoch seconds of the job's submission (Ray's ``start_time`` is set on submit, in ms)."""
    start_ms = job.get("start_time")
    return start_ms / 1000 if start_ms else time.time()


def _candidates(
    hook: RayJobsHook, job_key: str, known_submission_id: str | None
) -> list[dict[str, Any]]:
    """The jobs to decide from: the task's last submission alone when it settles the matter
    (still active, or succeeded: no try submits after either), else every job the cluster
    lists (a try may have submitted after it and died before recording that)."""
    if known_submission_id:
        job = hook.get_job(known_submission_id)
        decisive = job is not None and _job_key_of(job) == job_key
        if decisive and job is not None and job["status"] in (*ACTIVE_STATUSES, "SUCCEEDED"):
            return [job]
    return hook.list_jobs()


def plan_submission(
    hook: RayJobsHook,
    job_key: str,
    options: JobOptions | None = None,
    known_submission_id: str | None = None,
) -> SubmissionPlan:
    """Look up the jobs already submitted under ``job_key`` and decide what to do.

    ``known_submission_id`` (the task's last submission, from its state store) spares the
    listing of every job the cluster ever ran, which grows with the cluster's age, on the
    usual retry.

    An active job already past its deadline is not adopted: it is stopped (its own trigger
    may have died before it could) and, once Ray reports it terminal, replaced.

    Raises:
        RayJobStillRunningError: that job was not terminal within ``options.stop_wait_s``.
    """
    options = options or JobOptions()
    plan = choose_plan(_candidates(hook, job_key, known_submission_id), job_key)
    deadline = options.deadline_from(submitted_at(plan.job)) if plan.job else None
    if plan.action == "attach" and plan.job and deadline is not None and time.time() >= deadline:
        sid = plan.job["submission_id"]
        log.warning("Ray job %s ran past timeout_s=%g; stopping it", sid, options.timeout_s)
        final = hook.stop_and_wait(sid, options.stop_wait_s)
        return SubmissionPlan("submit", final or plan.job)
    return plan


def submit_new_job(
    hook: RayJobsHook,
    *,
    job_key: str,
    try_number: int,
    entrypoint: str,
    metadata: dict[str, str],
    options: JobOptions | None = None,
) -> str:
    """Submit as ``<job_key>-t<try_number>``, tagged with the key; returns the submission id.

    A cleared task can come back with a try number whose (failed) job is still listed; that id
    then gets a short random suffix rather than failing the task. A nonce in the metadata
    tells that apart from a retried POST whose first attempt reached Ray but lost its answer.
    """
    options = options or JobOptions()
    nonce = secrets.token_hex(4)
    tagged = {
        **metadata,
        JOB_KEY_METADATA_FIELD: job_key,
        "try_number": str(try_number),
        SUBMIT_NONCE_METADATA_FIELD: nonce,
    }

    def submit(submission_id: str) -> str:
        try:
            return hook.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                metadata=tagged,
                runtime_env=options.runtime_env,
                entrypoint_num_cpus=options.entrypoint_num_cpus,
                entrypoint_memory=options.entrypoint_memory,
                entrypoint_resources=options.entrypoint_resources,
                entrypoint_label_selector=options.entrypoint_label_selector,
            )
        except RaySubmissionExistsError:
            existing = hook.get_job(submission_id) or {}
            if (existing.get("metadata") or {}).get(SUBMIT_NONCE_METADATA_FIELD) == nonce:
                return submission_id
            raise

    submission_id = f"{job_key}-t{try_number}"
    try:
        return submit(submission_id)
    except RaySubmissionExistsError:
        return submit(f"{submission_id}-{secrets.token_hex(3)}")
