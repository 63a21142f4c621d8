"""Tracking against a real ``mlflow server`` over HTTP, as in production: parent/child runs
found by run key. The promote stage's registry behaviour is in ``test_registry.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import PipelineConfig, load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config(mlflow_server: str) -> PipelineConfig:
    loaded = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "tracking.tracking_uri": mlflow_server,
            "tracking.ui_url": mlflow_server,
            "tracking.experiment": "it-server",
            "tracking.registered_model": "it-model",
        },
    )
    # No artifact_location: the server picks its own store and proxies artifact traffic, as
    # in production (an override of None would mean "keep the file's value").
    tracking = loaded.tracking.model_copy(update={"artifact_location": None})
    return loaded.model_copy(update={"tracking": tracking})


def test_parent_and_child_runs_are_found_by_run_key(config: PipelineConfig) -> None:
    first = tracking.parent_run_id(config.tracking, "rk-1")
    assert tracking.parent_run_id(config.tracking, "rk-1") == first
    assert tracking.parent_run_id(config.tracking, "rk-2") != first
    with tracking.stage_run(config, "rk-1", "evaluate") as run_id:
        tracking.log_metrics(config.tracking, run_id, {"loss": 2.5}, step=3)
    client = tracking.client(config.tracking)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == first
    assert run.data.params["cpt.max_steps"] == "30"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 2.5)]


def test_failed_stage_marks_child_and_parent_failed(config: PipelineConfig) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run(config, "rk-fail", "evaluate") as run_id:
        raise RuntimeError("worker died")
    client = tracking.client(config.tracking)
    assert client.get_run(run_id).info.status == "FAILED"
    assert (
        client.get_run(tracking.parent_run_id(config.tracking, "rk-fail")).info.status == "FAILED"
    )
