"""Tracking and promotion against a real ``mlflow server`` over HTTP, as in production.

Parent/child runs by run key, the promote stage registering versions and moving the champion
alias only when the gates passed, and the champion's files downloaded back for evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import tracking
from pipeline.config import PipelineConfig, load_config
from pipeline.data.tokenizer import train_bpe_tokenizer
from pipeline.stages import promote
from pipeline.stages.common import StageContext
from pipeline.train.model import build_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config(mlflow_server: str) -> PipelineConfig:
    loaded = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "tracking.tracking_uri": mlflow_server,
            "tracking.experiment": "it-server",
            "tracking.registered_model": "it-model",
        },
    )
    # No artifact_location: the server picks its own store and proxies artifact traffic, as
    # in production (an override of None would mean "keep the file's value").
    tracking = loaded.tracking.model_copy(update={"artifact_location": None})
    return loaded.model_copy(update={"tracking": tracking})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, config: PipelineConfig) -> Path:
    out = tmp_path_factory.mktemp("model")
    tok = train_bpe_tokenizer(["rides and deliveries in Lisbon"] * 20, vocab_size=300)
    build_llama(config.model, tok, seq_len=64, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _promote(config: PipelineConfig, run_key: str, model: Path, tmp: Path, passed: bool) -> Any:
    report = tmp / f"{run_key}-report.json"
    report.write_text(json.dumps({"passed": passed, "gates": [{"name": "g", "passed": passed}]}))
    with tracking.stage_run(config, run_key, "promote") as run_id:
        ctx = StageContext(
            stage="promote",
            config=config,
            run_key=run_key,
            output_uri=str(tmp / run_key),
            previous={"sft_model": str(model), "eval_report": str(report)},
            mlflow_run_id=run_id,
        )
        return promote.run(ctx), run_id


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


def test_promote_moves_alias_only_when_gates_pass(
    config: PipelineConfig, tiny_model: Path, tmp_path: Path
) -> None:
    assert tracking.champion_version(config.tracking) is None
    first, first_run = _promote(config, "rk-a", tiny_model, tmp_path, passed=True)
    second, _ = _promote(config, "rk-b", tiny_model, tmp_path, passed=False)
    assert first.outputs["model_version"] == "1" and first.metrics["promoted"] == 1
    assert second.outputs["model_version"] == "2" and second.metrics["promoted"] == 0

    champion = tracking.champion_version(config.tracking)
    assert champion is not None and str(champion.version) == "1" and champion.run_id == first_run
    assert champion.source.startswith(
        "mlflow-artifacts:/"
    )  # served by the server, not a local path
    files = Path(
        tracking.download_model_version(config.tracking, champion.source, str(tmp_path / "dl"))
    )
    assert (files / "config.json").exists() and (files / "model.safetensors").exists()
    original = (tiny_model / "model.safetensors").read_bytes()
    assert (files / "model.safetensors").read_bytes() == original
    client = tracking.client(config.tracking)
    assert client.get_model_version("it-model", "2").tags["gates_passed"] == "false"
    parent = tracking.parent_run_id(config.tracking, "rk-a")
    assert client.get_run(parent).info.status == "FINISHED"
