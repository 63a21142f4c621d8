"""Hook for the Ray Jobs REST API (``/api/jobs/``) of a Ray head's dashboard.

It speaks HTTP with httpx instead of importing the Ray SDK, so Airflow workers and the
triggerer need neither ``ray`` nor a matching Ray version. Ray 2.60 clusters started with
``RAY_AUTH_MODE=token`` expect ``Authorization: Bearer <token>`` on every request; the token is
looked up in the places listed in ``TOKEN_LOOKUP_ORDER``, first hit wins.

Transient failures (connection refused, timeouts, HTTP 5xx: a head restart, a dashboard
hiccup) are retried with capped exponential backoff until ``transient_error_budget_s`` of
consecutive failure has passed; a rejected token (401/403) fails at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from airflow.sdk.bases.hook import BaseHook
from airflow.sdk.exceptions import AirflowException
from airflow.sdk.log import amask_secret, mask_secret

DEFAULT_TRANSIENT_ERROR_BUDGET_S = 600.0
"""Seconds of consecutive transient failures a call rides out when neither the caller nor the
connection extra ``transient_error_budget_s`` sets a budget; a head restart fits in it."""
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STOP_POLL_S = 0.5
"""Status poll interval while waiting for a stopped job to be reported STOPPED."""

if TYPE_CHECKING:
    from airflow.sdk import Connection

_EXCEPTION_LINE = re.compile(r"^\w+(?:Error|Exception): .*$", re.MULTILINE)
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_STATUSES = frozenset({"PENDING", "RUNNING"})
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
TOKEN_LOOKUP_ORDER = (
    "the connection password",
    "the connection extra 'auth_token_path' (a file)",
    "env RAY_AUTH_TOKEN",
    "env RAY_AUTH_TOKEN_PATH (a file)",
    DEFAULT_TOKEN_FILE,
)


class RayJobsError(AirflowException):
    """A Ray Jobs API call failed."""


class RayJobsAuthError(RayJobsError):
    """The Ray head rejected the bearer token (HTTP 401/403)."""


class RayJobsTransientError(RayJobsError):
    """A failure that may heal by waiting: no connection, a timeout, an HTTP 5xx."""


class RayJobsUnreachableError(RayJobsTransientError):
    """Nothing answered at the Ray dashboard address."""


class RayJobStillRunningError(RayJobsError):
    """A job asked to stop was not reported terminal within the stop wait."""


class RaySubmissionExistsError(RayJobsError):
    """A job with this submission id already exists on the cluster."""


@dataclass(frozen=True)
class RayAuthToken:
    """A bearer token and where it came from; only the source is ever printed."""

    value: str = field(repr=False)
    source: str


@dataclass(frozen=True)
class RayApiTarget:
    """Where requests go and how they authenticate, resolved once from the connection."""

    base_url: str
    token: RayAuthToken | None
    public_url: str = ""
    """The dashboard's address for links (``public_dashboard_url``); "" is ``base_url``."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token.value}"} if self.token else {}


def _read_token_file(path: str, source: str) -> RayAuthToken:
    file = Path(path).expanduser()
    try:
        value = file.read_text().strip()
    except OSError as err:
        raise RayJobsError(
            f"cannot read the Ray auth token file {file} named by {source}: {err}"
        ) from err
    if not value:
        raise RayJobsError(f"the Ray auth token file {file} named by {source} is empty")
    return RayAuthToken(value, f"{source} ({file})")


def resolve_auth_token(password: str | None, extra: dict[str, Any]) -> RayAuthToken | None:
    """Find the bearer token for a Ray head, in ``TOKEN_LOOKUP_ORDER``.

    Args:
        password: the connection's password, if any.
        extra: the connection's extra fields; ``auth_token_path`` names a token file.

    Returns:
        The token with a description of its source, or None when no source has one (the head
        then must run without token auth).

    Raises:
        RayJobsError: an explicitly configured token file is missing or empty; falling through
            to the next source would hide the misconfiguration behind a 401.
    """
    if password:
        return RayAuthToken(password, TOKEN_LOOKUP_ORDER[0])
    if extra.get("auth_token_path"):
        return _read_token_file(str(extra["auth_token_path"]), "connection extra auth_token_path")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return RayAuthToken(os.environ["RAY_AUTH_TOKEN"].strip(), "env RAY_AUTH_TOKEN")
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token_file(os.environ["RAY_AUTH_TOKEN_PATH"], "env RAY_AUTH_TOKEN_PATH")
    if Path(DEFAULT_TOKEN_FILE).expanduser().is_file():
        return _read_token_file(DEFAULT_TOKEN_FILE, "the default token file")
    return None


def dashboard_base_url(conn: Connection) -> str:
    """Base URL of the dashboard (where the Jobs API is) from a connection.

    ``host`` may be a full URL (``https://ray.example.com/ray``) or a bare name. A URI
    connection (``AIRFLOW_CONN_RAY_DEFAULT=https://ray.example.com/ray``) arrives as type
    ``https``, host and schema ``ray``: the type is then the scheme and the schema the path
    prefix (a dashboard behind an ingress). A connection of another type may name the scheme
    in its schema (``http``/``https``); any other schema is a path prefix; plain http by default.
    """
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise RayJobsError(f"connection {conn.conn_id!r} has no host; expected e.g. 127.0.0.1:8265")
    schema = (conn.schema or "").strip("/")
    prefix = ""
    if "://" not in host:
        if conn.conn_type in ("http", "https"):
            scheme, prefix = conn.conn_type, schema
        elif schema.lower() in ("http", "https"):
            scheme = schema.lower()
        else:
            scheme, prefix = "http", schema
        host = f"{scheme}://{host}"
    url = httpx.URL(host)
    if url.scheme not in ("http", "https"):
        raise RayJobsError(
            f"connection {conn.conn_id!r}: the Ray dashboard is reached over http or https, not "
            f"{url.scheme!r}; e.g. AIRFLOW_CONN_{conn.conn_id.upper()}=https://ray.example.com/ray"
        )
    if conn.port and url.port is None:
        url = url.copy_with(port=conn.port)
    if prefix:
        url = url.copy_with(path="/" + prefix)
    return str(url).rstrip("/")


def public_dashboard_url(extra: dict[str, Any], base_url: str) -> str:
    """Where a person opens the dashboard: the connection extra ``public_url`` (the ingress a
    browser reaches), else the API's own address (in-cluster names open only in the cluster)."""
    public = str(extra.get("public_url") or "").strip().rstrip("/")
    if public and not public.startswith(("http://", "https://")):
        raise RayJobsError(f"connection extra public_url must be an http(s) URL, got {public!r}")
    return public or base_url


@dataclass
class TransientRetry:
    """Backoff schedule of one call: 1 s, 2 s, 4 s ... capped at ``BACKOFF_MAX_S``, never
    sleeping past the budget; the budget counts consecutive failure from the first one."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next attempt, or None once the budget is spent."""
        left = self.budget_s - (time.monotonic() - self.started)
        if left <= 0:
            return None
        delay = min(BACKOFF_FIRST_S * 2**self.attempts, BACKOFF_MAX_S, left)
        self.attempts += 1
        return delay

    def exhausted(self, err: RayJobsError) -> RayJobsError:
        """The last error, saying how long it was retried; keeps its class."""
        elapsed = time.monotonic() - self.started
        note = (
            f" (retried for {elapsed:.0f} s, {self.attempts} retries, within "
            f"transient_error_budget_s={self.budget_s:g})"
            if self.attempts
            else ""
        )
        return type(err)(f"{err}{note}")


class RayJobsHook(BaseHook):
    """Submit, watch, stop and read logs of Ray jobs through the dashboard's REST API.

    Args:
        ray_conn_id: Airflow connection whose host/port (and optional schema) point at the
            Ray dashboard, e.g. ``AIRFLOW_CONN_RAY_DEFAULT=http://ray-head:8265``.
        connect_timeout: seconds to wait for a TCP connection; kept short so each attempt of
            a retried call fails fast.
        request_timeout: seconds for the whole request once connected.
        transient_error_budget_s: seconds of consecutive transient failures a call retries
            (with backoff) before it raises; None: the connection extra
            ``transient_error_budget_s``, else ``DEFAULT_TRANSIENT_ERROR_BUDGET_S``.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    hook_name = "Ray Jobs"

    def __init__(
        self,
        ray_conn_id: str = default_conn_name,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        transient_error_budget_s: float | None = None,
    ) -> None:
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self._budget_s = transient_error_budget_s
        self._target: RayApiTarget | None = None

    # -- connection ------------------------------------------------------------------------

    def _get_target(self) -> RayApiTarget:
        if self._target is None:
            conn = self.get_connection(self.ray_conn_id)
            self._target = self._target_from(conn, conn.extra_dejson, resolve_auth_token)
            if self._target.token:
                mask_secret(self._target.token.value)  # keep it out of logs even in errors
        return self._target

    async def _aget_target(self) -> RayApiTarget:
        # Inside the triggerer's event loop: the connection lookup and the token file read
        # must not block it.
        if self._target is None:
            conn = await self.aget_connection(self.ray_conn_id)
            extra = await conn.aextra_dejson()
            token = await asyncio.to_thread(resolve_auth_token, conn.password, extra)
            self._target = self._target_from(conn, extra, lambda _password, _extra: token)
            if token:
                await amask_secret(token.value)
        return self._target

    def _target_from(
        self,
        conn: Connection,
        extra: dict[str, Any],
        token_of: Callable[[str | None, dict[str, Any]], RayAuthToken | None],
    ) -> RayApiTarget:
        if self._budget_s is None:
            self._budget_s = float(
                extra.get("transient_error_budget_s", DEFAULT_TRANSIENT_ERROR_BUDGET_S)
            )
        base_url = dashboard_base_url(conn)
        return RayApiTarget(
            base_url, token_of(conn.password, extra), public_dashboard_url(extra, base_url)
        )

    def dashboard_job_url(self, submission_id: str) -> str:
        """Link to the job's page in the Ray dashboard."""
        return job_page_url(self._get_target().public_url, submission_id)

    async def adashboard_job_url(self, submission_id: str) -> str:
        """Async twin of :meth:`dashboard_job_url` for the triggerer."""
        return job_page_url((await self._aget_target()).public_url, submission_id)

    async def abase_url(self) -> str:
        """The dashboard's base URL, for messages about the head itself."""
        return (await self._aget_target()).base_url

    # -- requests --------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, json: Any = None, *, retry: bool = True
    ) -> httpx.Response:
        """One API call; transient failures are retried within the budget unless ``retry``
        is False (best-effort calls such as log reads)."""
        target = self._get_target()
        schedule = TransientRetry(self._budget_s if retry and self._budget_s else 0.0)
        while True:
            try:
                with httpx.Client(timeout=self._timeout, headers=target.headers) as client:
                    return self._checked(client.request(method, target.base_url + path, json=json))
            except httpx.TransportError as err:
                failure: RayJobsError = self._transport_error(target.base_url + path, err)
            except RayJobsTransientError as err:
                failure = err
            delay = schedule.next_delay()
            if delay is None:
                raise schedule.exhausted(failure) from failure
            self.log.warning("Ray API call failed, retrying in %.0f s: %s", delay, failure)
            time.sleep(delay)

    async def _arequest(
        self, method: str, path: str, json: Any = None, *, retry: bool = True
    ) -> httpx.Response:
        """Async twin of :meth:`_request`: the same retry schedule, sleeping without blocking."""
        target = await self._aget_target()
        schedule = TransientRetry(self._budget_s if retry and self._budget_s else 0.0)
        while True:
            try:
                async with httpx.AsyncClient(
                    timeout=self._timeout, headers=target.headers
                ) as client:
                    response = await client.request(method, target.base_url + path, json=json)
                return self._checked(response)
            except httpx.TransportError as err:
                failure: RayJobsError = self._transport_error(target.base_url + path, err)
            except RayJobsTransientError as err:
                failure = err
            delay = schedule.next_delay()
            if delay is None:
                raise schedule.exhausted(failure) from failure
            self.log.warning("Ray API call failed, retrying in %.0f s: %s", delay, failure)
            await asyncio.sleep(delay)

    def _transport_error(self, url: str, err: httpx.TransportError) -> RayJobsError:
        if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
            env_var = f"AIRFLOW_CONN_{self.ray_conn_id.upper()}"
            return RayJobsUnreachableError(
                f"cannot reach the Ray Jobs API at {url} (Airflow connection "
                f"{self.ray_conn_id!r}): {type(err).__name__}: {err}. The Ray head is down or "
                f"unreachable from this host: if its cluster was torn down (e.g. the head of a "
                f"finished `make demo`), its jobs and dashboard links are gone with it. "
                f"Otherwise check that the head runs with its dashboard reachable, and that "
                f"the connection ({env_var} or the Airflow UI) points at the dashboard port "
                f"(default 8265)."
            )
        return RayJobsTransientError(
            f"request to the Ray Jobs API at {url} failed: {type(err).__name__}: {err}"
        )

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """Turn HTTP errors into exceptions that say what to fix; 404 is left to the caller."""
        code, text = response.status_code, _error_summary(response.text)
        where = f"{response.request.method} {response.request.url}"
        if code in (401, 403):
            token = self._target.token if self._target else None
            sent = f"a token from {token.source}" if token else "no token"
            raise RayJobsAuthError(
                f"Ray rejected {where} with HTTP {code} ({text}). The cluster has token auth "
                f"on (RAY_AUTH_MODE=token) and this hook sent {sent} for connection "
                f"{self.ray_conn_id!r}. The token is looked up, first hit wins, in: "
                f"{'; '.join(TOKEN_LOOKUP_ORDER)}. It must equal the head's token."
            )
        if code >= 400 and "already exists" in response.text:
            raise RaySubmissionExistsError(f"{where} failed: {text}")
        if code >= 500:
            # Includes "No available agent" from a head whose job agent is still starting.
            raise RayJobsTransientError(f"{where} failed with HTTP {code}: {text}")
        if code >= 400 and code != 404:
            raise RayJobsError(f"{where} failed with HTTP {code}: {text}")
        return response

    # -- jobs API --------------------------------------------------------------------------

    def submit_job(
        self,
        *,
        entrypoint: str,
        submission_id: str,
        metadata: dict[str, str] | None = None,
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: dict[str, float] | None = None,
        entrypoint_label_selector: dict[str, str] | None = None,
    ) -> str:
        """Submit a job and return its submission id.

        The ``entrypoint_*`` fields reserve resources for the driver process (Ray's
        ``JobSubmitRequest``), so it is placed on a node that has them, not on the head.

        Raises:
            RaySubmissionExistsError: a job with ``submission_id`` exists already.
            RayJobsAuthError: the token was rejected (at once, never retried).
            RayJobsUnreachableError, RayJobsTransientError: still failing once the
                transient-error budget is spent (this includes a head whose job agent is
                not up yet: "No available agent").
            RayJobsError: any other rejection, e.g. an invalid runtime_env.
        """
        fields = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "metadata": metadata,
            "runtime_env": runtime_env,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_resources": entrypoint_resources,
            "entrypoint_label_selector": entrypoint_label_selector,
        }
        body = {name: value for name, value in fields.items() if value is not None}
        response = self._request("POST", "/api/jobs/", json=body)
        self._raise_if_404(response)
        submitted: str = response.json()["submission_id"]
        self.log.info("submitted Ray job %s: %s", submitted, self.dashboard_job_url(submitted))
        return submitted

    def get_job(self, submission_id: str) -> dict[str, Any] | None:
        """The job's info (status, message, start/end time in ms, metadata ...); None if absent."""
        response = self._request("GET", f"/api/jobs/{_quoted(submission_id)}")
        return self._job_or_none(response)

    async def aget_job(self, submission_id: str) -> dict[str, Any] | None:
        """Async twin of :meth:`get_job`, for the triggerer."""
        response = await self._arequest("GET", f"/api/jobs/{_quoted(submission_id)}")
        return self._job_or_none(response)

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster knows, in any status."""
        response = self._request("GET", "/api/jobs/")
        self._raise_if_404(response)
        jobs: list[dict[str, Any]] = response.json()
        return jobs

    def stop_job(self, submission_id: str) -> bool:
        """Ask Ray to stop a job (stop, never delete: the record and logs stay); False when it
        had already ended or does not exist. Ray reports STOPPED a few seconds later."""
        response = self._request("POST", f"/api/jobs/{_quoted(submission_id)}/stop")
        return response.status_code != 404 and bool(response.json().get("stopped"))

    async def astop_job(self, submission_id: str) -> bool:
        """Async twin of :meth:`stop_job`."""
        response = await self._arequest("POST", f"/api/jobs/{_quoted(submission_id)}/stop")
        return response.status_code != 404 and bool(response.json().get("stopped"))

    def stop_and_wait(self, submission_id: str, wait_s: float) -> dict[str, Any] | None:
        """Stop a job and poll until Ray reports it terminal, so the next try never finds it
        still listed RUNNING; returns its final info (None when it does not exist).

        Raises:
            RayJobStillRunningError: not terminal after ``wait_s`` seconds.
        """
        self.stop_job(submission_id)
        deadline = time.monotonic() + wait_s
        while True:
            job = self.get_job(submission_id)
            if job is None or job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() > deadline:
                raise _still_running(submission_id, job, wait_s)
            time.sleep(STOP_POLL_S)

    async def astop_and_wait(self, submission_id: str, wait_s: float) -> dict[str, Any] | None:
        """Async twin of :meth:`stop_and_wait`."""
        await self.astop_job(submission_id)
        deadline = time.monotonic() + wait_s
        while True:
            job = await self.aget_job(submission_id)
            if job is None or job["status"] in TERMINAL_STATUSES:
                return job
            if time.monotonic() > deadline:
                raise _still_running(submission_id, job, wait_s)
            await asyncio.sleep(STOP_POLL_S)

    def get_job_logs(self, submission_id: str, *, retry: bool = True) -> str:
        """The driver's whole log (stdout and stderr of the entrypoint)."""
        response = self._request("GET", f"/api/jobs/{_quoted(submission_id)}/logs", retry=retry)
        self._raise_if_404(response)
        logs: str = response.json().get("logs", "")
        return logs

    async def aget_job_logs(self, submission_id: str, *, retry: bool = True) -> str:
        """Async twin of :meth:`get_job_logs`."""
        path = f"/api/jobs/{_quoted(submission_id)}/logs"
        response = await self._arequest("GET", path, retry=retry)
        self._raise_if_404(response)
        # Decoding a long log takes long enough to stall the triggerer's other triggers.
        body: dict[str, Any] = await asyncio.to_thread(response.json)
        logs: str = body.get("logs", "")
        return logs

    def _job_or_none(self, response: httpx.Response) -> dict[str, Any] | None:
        # Ray answers an unknown id with 404 "Job <id> does not exist"; any other 404 means the
        # connection points at something that is not a Ray dashboard.
        if response.status_code == 404 and "does not exist" in response.text:
            return None
        self._raise_if_404(response)
        job: dict[str, Any] = response.json()
        return job

    def _raise_if_404(self, response: httpx.Response) -> None:
        if response.status_code == 404:
            raise RayJobsError(
                f"{response.request.method} {response.request.url} returned 404 "
                f"({response.text.strip()[:300]}); is connection {self.ray_conn_id!r} pointing "
                "at a Ray dashboard?"
            )


def _still_running(
    submission_id: str, job: dict[str, Any], wait_s: float
) -> RayJobStillRunningError:
    pending = (
        " A PENDING driver was never placed, and Ray carries out its stop only once it is: "
        "it fails such a job after RAY_JOB_START_TIMEOUT_SECONDS (default 900) on the head; "
        "check that some node offers the stage's entrypoint resources."
        if job["status"] == "PENDING"
        else ""
    )
    return RayJobStillRunningError(
        f"Ray job {submission_id} is still {job['status']} {wait_s:g} s after it was asked to "
        "stop; a new attempt would run next to it. Stop it from the Ray dashboard (or `ray job "
        f"stop`), or raise orchestration.stop_wait_s in the pipeline config.{pending}"
    )


def job_page_url(base_url: str, submission_id: str) -> str:
    """The dashboard's page for one job (a client-side route, hence the ``#``)."""
    return f"{base_url}/#/jobs/{submission_id}"


def _quoted(submission_id: str) -> str:
    return quote(submission_id, safe="")


def _error_summary(body: str) -> str:
    """The gist of an error body: Ray answers server errors with whole Python tracebacks,
    nested when the head relays an agent's error; the innermost ``XxxError: ...`` line says it."""
    raised = _EXCEPTION_LINE.findall(body)
    return raised[-1].strip()[:500] if raised else body.strip()[:1000]
