"""An ``mlflow server`` on a free port: runs, the model registry and proxied artifacts, as the
tracking server of production serves them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.devstack.host import LOOPBACK, free_port, stop_process_group


@contextmanager
def mlflow_server(
    workdir: Path,
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    host: str = LOOPBACK,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` (one worker, serving artifacts) on a free port; stop it on exit.

    Args:
        workdir: the server's working directory and log folder.
        backend_store_uri: runs and registry (``sqlite:///...``, ``postgresql://...``).
        artifacts_destination: where the server stores the artifacts it proxies (a folder or
            ``s3://bucket/prefix``; for S3 ``env`` carries ``MLFLOW_S3_ENDPOINT_URL`` and keys).
        host: address to bind; clients must call it by that address (the server refuses
            other ``Host`` headers).
        env: environment of the server over this one's.

    Yields:
        The server's URL, once ``/health`` answers.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{host}:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        f"--backend-store-uri={backend_store_uri}",
        f"--artifacts-destination={artifacts_destination}",
        f"--host={host}",
        f"--port={port}",
        "--workers=1",
    ]
    if host != LOOPBACK:  # MLflow's default allows loopback and private addresses only
        cmd.append(f"--allowed-hosts={host}:{port},{host}")
    log = workdir / f"mlflow-server-{port}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            # MLflow 3's server jobs (GenAI evaluation, trace rollups) are not used here, and
            # each server would start seven huey consumers holding 1.2 GB between them.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
            cwd=workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError) as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {log}") from err
                time.sleep(1)
        yield url
    finally:
        stop_process_group(proc)
