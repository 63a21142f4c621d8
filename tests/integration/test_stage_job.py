"""A real stage as a real Ray job: prepare_data submitted through the Jobs REST API (token auth)
to a local head, its committed result read back, a retry reusing it, and bad data failing with
the file and line in the job's logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.data.shards import read_manifest, read_split
from pipeline.devstack.ray_cluster import RayHead
from pipeline.identity import write_resolved_config
from ray_jobs.hooks import RayJobsHook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(root: Path, domain: Path | None = None, **more: Any) -> str:
    """Resolved demo config with a private artifact root and MLflow store; returns its URI."""
    overrides: dict[str, Any] = {
        **more,
        "storage.artifact_root": str(root / "artifacts"),
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "tracking.artifact_location": str(root / "mlruns"),
    }
    if domain is not None:
        overrides["data.domain_corpus"] = str(domain)
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    return write_resolved_config(config, "it-run")


def _run_job(hook: RayJobsHook, entrypoint: str, submission_id: str) -> dict[str, Any]:
    hook.submit_job(entrypoint=entrypoint, submission_id=submission_id)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = hook.get_job(submission_id)
        assert job is not None
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {submission_id} did not finish in time")


@pytest.fixture()
def hook(ray_head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayJobsHook:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_STAGE", ray_head.airflow_conn_uri())
    return RayJobsHook("ray_stage")


def test_prepare_data_job_commits_and_a_retry_reuses_it(hook: RayJobsHook, tmp_path: Path) -> None:
    config_uri = _config(tmp_path)
    entry = f"python -m pipeline.stages.prepare_data --config {config_uri} --run-key it-run"
    job = _run_job(hook, entry, "it-prepare-1")
    assert job["status"] == "SUCCEEDED", hook.get_job_logs("it-prepare-1")[-3000:]

    stage_dir = tmp_path / "artifacts" / "it-run" / "prepare_data"
    assert (stage_dir / "_SUCCESS").exists()
    result = json.loads((stage_dir / "result.json").read_text())
    metrics = result["metrics"]
    # The demo corpus repeats 40 documents verbatim and carries e-mails and phone numbers.
    assert metrics["documents_duplicates"] >= 40
    assert metrics["pii_replacements"] > 100
    assert metrics["cpt_train_blocks"] > 5 * metrics["cpt_heldout_blocks"] > 0

    manifest = read_manifest(result["outputs"]["data"])
    train = read_split(result["outputs"]["data"], manifest, "sft_train")
    assert train.input_ids.shape == (metrics["sft_train_blocks"], 256)
    assert train.trained_tokens == metrics["sft_train_trained_tokens"]
    heldout = json.loads((stage_dir / "data" / "heldout.json").read_text())
    assert not any("@example.com" in doc for doc in heldout["documents"])
    # Progress went to the stage's MLflow run as it ran; its last point is the whole input.
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        result["mlflow_run_id"], "prepare_records"
    )
    assert history and history[-1].value == manifest["counts"]["read"]
    assert "prepare_data: " in hook.get_job_logs("it-prepare-1") and "ETA" in hook.get_job_logs(
        "it-prepare-1"
    )

    retry = _run_job(hook, entry, "it-prepare-2")
    assert retry["status"] == "SUCCEEDED"
    assert "already committed" in hook.get_job_logs("it-prepare-2")
    assert json.loads((stage_dir / "result.json").read_text()) == result


def test_bad_data_fails_the_job_naming_file_and_line(hook: RayJobsHook, tmp_path: Path) -> None:
    bad = tmp_path / "domain.jsonl"
    # Bad records are quarantined and counted; the stage fails once they pass
    # data.max_bad_fraction (1% of all records read, the 600 demo chats included).
    bad.write_text('{"text": "a valid first document about rides"}\n\n' + '{"text": oops}\n' * 20)
    config_uri = _config(tmp_path, domain=bad)
    entry = f"python -m pipeline.stages.prepare_data --config {config_uri} --run-key it-run"
    job = _run_job(hook, entry, "it-prepare-bad")
    assert job["status"] == "FAILED"
    assert f"{bad}:3: not valid JSON" in hook.get_job_logs("it-prepare-bad")
    assert not (tmp_path / "artifacts" / "it-run" / "prepare_data" / "_SUCCESS").exists()
    raw = yaml.safe_load(Path(config_uri).read_text())
    assert raw["data"]["domain_corpus"] == str(bad)


def test_training_workers_no_node_can_host_fail_within_the_placement_timeout(
    hook: RayJobsHook, tmp_path: Path
) -> None:
    """Two h100 workers on a head without GPUs: the job fails in seconds, not at the 72 h stage
    deadline, naming what is short and the setting."""
    overrides = {"compute.pool": "h100", "compute.placement_timeout_minutes": 0.1}
    config_uri = _config(tmp_path)
    prepare = f"python -m pipeline.stages.prepare_data --config {config_uri} --run-key it-run"
    assert _run_job(hook, prepare, "it-place-data")["status"] == "SUCCEEDED"
    gpu_config = _config(tmp_path, **overrides)
    data = tmp_path / "artifacts" / "it-run" / "prepare_data"
    train = (
        f"python -m pipeline.stages.continued_pretraining --config {gpu_config} "
        f"--run-key it-run --input {data}"
    )
    started = time.monotonic()
    job = _run_job(hook, train, "it-place-train")
    waited = time.monotonic() - started
    assert job["status"] == "FAILED"
    logs = hook.get_job_logs("it-place-train")
    assert (
        "could not place 2 h100 training workers within compute.placement_timeout_minutes=0.1"
        in logs
    )
    assert "GPU: 2 needed, 0 in the cluster (0 free)" in logs
    assert "pool_h100: 2 needed, 0 in the cluster (0 free)" in logs
    assert waited < 90  # 6 s of waiting plus the job's start and the stage's setup
    assert not (tmp_path / "artifacts" / "it-run" / "continued_pretraining" / "_SUCCESS").exists()
