"""A run's identity: its resolved config, the code version, and when a committed stage result
may stand in for a new attempt.

One DAG run keeps one resolved config and one code version (``resolve_config`` fixes both);
each stage's result carries a digest chained through the stages, so a changed upstream output,
config or code makes every later result stale. Light (no Ray, no torch): the Airflow side uses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

import pipeline
from pipeline import storage
from pipeline.config import PipelineConfig, config_from_dict
from pipeline.contract import CONFIG_FILE


def write_resolved_config(config: PipelineConfig, run_key: str) -> str:
    """Write the run's resolved config next to its artifacts; returns its URI."""
    uri = storage.join(config.storage.artifact_root, run_key, CONFIG_FILE)
    storage.write_bytes(
        uri, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode()
    )
    return uri


def read_resolved_config(uri: str) -> PipelineConfig:
    try:
        raw = yaml.safe_load(storage.read_bytes(uri))
    except FileNotFoundError as err:
        raise SystemExit(f"resolved config not found: {uri}") from err
    return config_from_dict(raw, source=uri)


@functools.cache
def code_version() -> str:
    """``<pipeline.__version__>+src.<hash>``: the package version and a hash of its source files.

    A content hash rather than a git sha: it is the same wherever the same code runs (a git
    checkout on the Airflow host, a wheel in the Ray worker image, a ``working_dir`` upload),
    and it changes with uncommitted edits. Hashing the ~50 modules takes about a millisecond.
    """
    root = Path(pipeline.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{pipeline.__version__}+src.{digest.hexdigest()[:10]}"


CODE_VERSION_MISMATCH = "code version mismatch:"
"""How a stage's error starts when the run's code changed under it; the Ray operator
(plugins/ray_jobs/operators.py) fails the task without retries on seeing it."""


def check_code_version(expected: str | None) -> None:
    """Exit with status 2 when the installed code is not the code the run was resolved with.

    The policy: one DAG run, one code version. ``resolve_config`` fixes it for the run and
    every stage checks it, so a run's models and metrics come from one version of the code
    even when images are redeployed under it; a new version applies to runs resolved after
    the deploy, or to this one once ``resolve_config`` is cleared (the message says so).

    Args:
        expected: ``--code-version`` from the entrypoint (Airflow's ``code_version()``); None
            (a stage started by hand) skips the check.
    """
    installed = code_version()
    if expected is None or expected == installed:
        return
    print(
        f"{CODE_VERSION_MISMATCH} this run was resolved with pipeline {expected}, but this Ray "
        f"job runs pipeline {installed} (its image or runtime_env changed since). A run keeps "
        "one code version, so retrying cannot help. To finish this run on the new code, clear "
        "its resolve_config task with Downstream in the Airflow UI: the run is resolved again "
        "and its stages run on the new code. If no deploy was meant, make the Ray workers' "
        "image (or orchestration.runtime_env) hold the Airflow deployment's pipeline code; pin "
        "both images by digest or by a tag that changes with the code, so a deploy never "
        "changes a running run's code.",
        file=sys.stderr,
    )
    raise SystemExit(2)


def result_digest(config_fingerprint: str, outputs: dict[str, Any], input_digest: str) -> str:
    """Hash of what a stage result stands for: its config, its outputs and its inputs' digest.

    Chained through the stages (each input digest is the previous stage's result digest), so
    the inputs fingerprint of every downstream task changes when an upstream output changes.
    """
    blob = json.dumps([config_fingerprint, outputs, input_digest], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reusable(done: dict[str, Any] | None, identity: dict[str, str]) -> bool:
    """A committed result may stand in for this attempt only when config fingerprint, input
    digest and code version all match (``identity`` holds the three)."""
    return done is not None and all(done.get(k) == v for k, v in identity.items())
