"""What every stage entrypoint shares: arguments, the resolved config, reuse of a committed
result (``pipeline.identity``), the MLflow child run, and the ``result.json`` + ``_SUCCESS``
commit.

A stage module defines ``run(ctx) -> StageOutput`` and calls ``stage_main(STAGE, run)`` under
``if __name__ == "__main__"``; the Ray job's entrypoint is ``python -m pipeline.stages.<name>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage, tracking
from pipeline.config import PipelineConfig
from pipeline.identity import (
    check_code_version,
    code_version,
    read_resolved_config,
    result_digest,
    reusable,
)

log = logging.getLogger("pipeline.stages")


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
