"""What every stage entrypoint shares: arguments, the resolved config, reuse of a committed
result, the MLflow child run, and the ``result.json`` + ``_SUCCESS`` commit.

A stage module defines ``run(ctx) -> StageOutput`` and calls ``stage_main(STAGE, run)`` under
``if __name__ == "__main__"``; the Ray job's entrypoint is ``python -m pipeline.stages.<name>``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import pipeline
from pipeline import storage, tracking
from pipeline.config import PipelineConfig, config_from_dict

log = logging.getLogger("pipeline.stages")

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class StageContext:
    """Everything a stage needs; built from the command line by ``stage_main``."""

    stage: str
    config: PipelineConfig
    run_key: str
    output_uri: str
    """``<artifact_root>/<run_key>/<stage>``."""
    previous: dict[str, Any]
    """``outputs`` of the previous stage's result (empty for the first stage)."""
    mlflow_run_id: str


@dataclass
class StageOutput:
    outputs: dict[str, str] = field(default_factory=dict)
    """URIs this stage produced; merged over the previous stage's so later stages see all."""
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    """Lines the Airflow task log ends with (final loss, tokens, gate table, decision)."""
    report_url: str | None = None
    """A page a person reads about this stage (evaluate's HTML report); the Airflow task shows
    it as the "Report" link."""
    skip_reason: str | None = None
    """Set when the stage decided not to act (promotion refused by a gate): the Airflow task
    ends skipped with this reason instead of succeeded."""


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


def parse_args(stage: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}")
    parser.add_argument("--config", required=True, help="URI of the run's resolved config.yaml")
    parser.add_argument("--run-key", required=True, help="identifies the DAG run; names the folder")
    parser.add_argument("--input", default=None, help="output folder URI of the previous stage")
    parser.add_argument(
        "--code-version",
        default=None,
        help="code version Airflow resolved the run with; the job exits 2 when it differs",
    )
    parser.add_argument(
        "--inputs-fingerprint",
        default=None,
        help="fingerprint of the run's input data (first stage): a committed result made from "
        "other data is not reused",
    )
    return parser.parse_args(argv)


def previous_result(input_uri: str | None) -> dict[str, Any]:
    """The previous stage's committed ``result.json`` (empty for the first stage)."""
    if input_uri is None:
        return {}
    result = storage.committed_result(input_uri)
    if result is None:
        raise SystemExit(
            f"previous stage output {input_uri} has no {storage.SUCCESS_MARKER}; run that stage first"
        )
    return result


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


def stage_main(
    stage: str, run: Callable[[StageContext], StageOutput], argv: list[str] | None = None
) -> dict[str, Any]:
    """Run one stage attempt, or return the committed result of an identical earlier attempt."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(stage, argv)
    check_code_version(args.code_version)
    config = read_resolved_config(args.config)
    output_uri = storage.stage_uri(config.storage.artifact_root, args.run_key, stage)
    upstream = previous_result(args.input)
    # The first stage's inputs are data files: their fingerprint comes from Airflow.
    input_digest = str(upstream.get("result_digest") or args.inputs_fingerprint or "")
    identity = {
        "config_fingerprint": config.fingerprint(),
        "input_digest": input_digest,
        "code_version": code_version(),
    }
    done = storage.committed_result(output_uri)
    if done is not None and reusable(done, identity):
        log.info("%s already committed at %s; reusing its result", stage, output_uri)
        print(json.dumps(done))
        return done
    if done is not None:
        changed = sorted(k for k, v in identity.items() if done.get(k) != v)
        log.info("%s result at %s is stale (%s changed); running again", stage, output_uri, changed)
        # Withdrawn before anything is rewritten: a crash part-way must not leave the old
        # marker standing over a half-new folder (a later attempt would take it as committed).
        storage.remove(storage.join(output_uri, storage.SUCCESS_MARKER))
    previous: dict[str, Any] = upstream.get("outputs", {})
    started = time.time()
    with tracking.stage_run(config, args.run_key, stage) as run_id:
        ctx = StageContext(stage, config, args.run_key, output_uri, previous, run_id)
        out = run(ctx)
        numeric = {k: v for k, v in out.metrics.items() if isinstance(v, int | float)}
        tracking.log_metrics(config.tracking, run_id, numeric)
    outputs = {**previous, **out.outputs}
    result = {
        "stage": stage,
        "status": "succeeded",
        "run_key": args.run_key,
        **identity,
        "result_digest": result_digest(identity["config_fingerprint"], outputs, input_digest),
        "output_uri": output_uri,
        "outputs": outputs,
        "metrics": out.metrics,
        "summary": out.summary,
        "skip_reason": out.skip_reason,
        "report_url": out.report_url,
        "mlflow_run_id": run_id,
        "mlflow_run_url": tracking.run_url(config.tracking, run_id),
        "seconds": round(time.time() - started, 1),
    }
    storage.commit(output_uri, result)
    log.info("%s committed to %s", stage, output_uri)
    print(json.dumps(result))
    return result
