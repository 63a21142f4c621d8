"""What every stage entrypoint shares: arguments, the resolved config, reuse of a committed
result, the MLflow child run, and the ``result.json`` + ``_SUCCESS`` commit.

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

import yaml

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


def parse_args(stage: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{stage}")
    parser.add_argument("--config", required=True, help="URI of the run's resolved config.yaml")
    parser.add_argument("--run-key", required=True, help="identifies the DAG run; names the folder")
    parser.add_argument("--input", default=None, help="output folder URI of the previous stage")
    return parser.parse_args(argv)


def previous_outputs(input_uri: str | None) -> dict[str, Any]:
    if input_uri is None:
        return {}
    result = storage.committed_result(input_uri)
    if result is None:
        raise SystemExit(
            f"previous stage output {input_uri} has no {storage.SUCCESS_MARKER}; run that stage first"
        )
    outputs: dict[str, Any] = result["outputs"]
    return outputs


def stage_main(
    stage: str, run: Callable[[StageContext], StageOutput], argv: list[str] | None = None
) -> dict[str, Any]:
    """Run one stage attempt, or return the committed result of an identical earlier attempt."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(stage, argv)
    config = read_resolved_config(args.config)
    output_uri = storage.stage_uri(config.storage.artifact_root, args.run_key, stage)
    done = storage.committed_result(output_uri)
    if done is not None and done.get("config_fingerprint") == config.fingerprint():
        log.info("%s already committed at %s; reusing its result", stage, output_uri)
        print(json.dumps(done))
        return done
    previous = previous_outputs(args.input)
    started = time.time()
    with tracking.stage_run(config, args.run_key, stage) as run_id:
        ctx = StageContext(stage, config, args.run_key, output_uri, previous, run_id)
        out = run(ctx)
        numeric = {k: v for k, v in out.metrics.items() if isinstance(v, int | float)}
        tracking.log_metrics(config.tracking, run_id, numeric)
    result = {
        "stage": stage,
        "status": "succeeded",
        "run_key": args.run_key,
        "config_fingerprint": config.fingerprint(),
        "output_uri": output_uri,
        "outputs": {**previous, **out.outputs},
        "metrics": out.metrics,
        "summary": out.summary,
        "skip_reason": out.skip_reason,
        "mlflow_run_id": run_id,
        "mlflow_run_url": tracking.run_url(config.tracking, run_id),
        "seconds": round(time.time() - started, 1),
    }
    storage.commit(output_uri, result)
    log.info("%s committed to %s", stage, output_uri)
    print(json.dumps(result))
    return result
