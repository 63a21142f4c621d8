"""Training survives failures: real Ray jobs of the continued-pretraining stage on two gloo
workers (DeepSpeed ZeRO-3 with CPU optimizer offload), with faults injected through
``PIPELINE_FAULTS`` in the job's environment (pipeline/train/faults.py).

Every run trains the same tiny model on the same prepared data with the same seed, so a run
that was killed and resumed must reproduce the uninterrupted run's losses and data order step
by step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.devstack.ray_cluster import RayHead
from pipeline.identity import write_resolved_config
from pipeline.stages import prepare_data
from pipeline.stages.entrypoint import stage_main
from ray_jobs.hooks import RayJobsHook

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE = "continued_pretraining"
TRAIN = {
    "cpt.max_steps": 8,
    "cpt.checkpoint_every": 2,
    "cpt.keep_last": 2,
    "cpt.warmup_steps": 1,
    "cpt.micro_batch_size": 2,
}
PINNED_LOSSES = [6.941074, 6.749169, 6.494521, 6.26259, 6.054461, 5.898691, 5.806382, 5.716994]
"""Per-step loss of the uninterrupted run at seed 0 (the demo data's tokenizer and model)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resilience")


def _config_uri(workdir: Path, run_key: str, **overrides: Any) -> str:
    base = {
        "storage.artifact_root": str(workdir / "artifacts"),
        "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
        "tracking.artifact_location": str(workdir / "mlruns"),
        **TRAIN,
    }
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", base | overrides)
    return write_resolved_config(config, run_key)


@pytest.fixture(scope="module")
def prepared(workdir: Path) -> str:
    """prepare_data's output folder (run in-process: it is not what these tests exercise)."""
    uri = _config_uri(workdir, "prep")
    stage_main("prepare_data", prepare_data.run, ["--config", uri, "--run-key", "prep"])
    return str(workdir / "artifacts" / "prep" / "prepare_data")


@pytest.fixture(scope="module")
def hook(ray_head: RayHead) -> Iterator[RayJobsHook]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_RAY_RESILIENCE", ray_head.airflow_conn_uri())
        yield RayJobsHook("ray_resilience")


def _submit(
    hook: RayJobsHook,
    config_uri: str,
    run_key: str,
    input_uri: str,
    job_id: str,
    env: dict[str, str],
) -> None:
    entry = (
        f"python -m pipeline.stages.{STAGE} --config {config_uri} --run-key {run_key} "
        f"--input {input_uri}"
    )
    hook.submit_job(entrypoint=entry, submission_id=job_id, runtime_env={"env_vars": env})


def _wait(hook: RayJobsHook, job_id: str, timeout: float = 400) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = hook.get_job(job_id)
        assert job is not None
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return job["status"], hook.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in time")


def _run(
    hook: RayJobsHook,
    workdir: Path,
    prepared: str,
    run_key: str,
    job_id: str,
    faults: str = "",
    **overrides: Any,
) -> tuple[str, str]:
    config_uri = _config_uri(workdir, run_key, **overrides)
    _submit(hook, config_uri, run_key, prepared, job_id, {"PIPELINE_FAULTS": faults})
    return _wait(hook, job_id)


def _metrics(root: str, run_key: str) -> dict[str, Any]:
    uri = storage.join(root, run_key, STAGE, "model", "train_metrics.json")
    metrics: dict[str, Any] = storage.read_json(uri)
    return metrics


def _checkpoints(root: str, run_key: str) -> tuple[str, list[str]]:
    """The checkpoint series folder of a run and the names in it."""
    base = storage.join(root, run_key, STAGE, "checkpoints")
    (series,) = storage.list_children(base)
    folder = storage.join(base, series)
    # DeepSpeed also drops its zero_to_fp32.py converter script next to local checkpoints.
    names = [n for n in storage.list_children(folder) if n.startswith(("step-", "latest"))]
    return folder, names


@pytest.fixture(scope="module")
def uninterrupted(hook: RayJobsHook, workdir: Path, prepared: str) -> dict[str, Any]:
    status, logs = _run(hook, workdir, prepared, "clean", "resilience-clean")
    assert status == "SUCCEEDED", logs[-3000:]
    return _metrics(str(workdir / "artifacts"), "clean")


def test_uninterrupted_run_checkpoints_and_keeps_the_newest(
    uninterrupted: dict[str, Any], workdir: Path
) -> None:
    assert uninterrupted["steps"] == 8 and uninterrupted["resumed_from_step"] == 0
    assert uninterrupted["checkpoint_steps"] == [2, 4, 6, 8]
    folder, names = _checkpoints(str(workdir / "artifacts"), "clean")
    assert names == ["latest", "step-0000006", "step-0000008"]  # keep_last=2
    assert Path(folder, "latest").read_text() == "step-0000008"
    assert Path(folder, "step-0000008", "_COMPLETE").exists()
    loop_state = json.loads(Path(folder, "step-0000008", "loop_state.json").read_text())
    assert loop_state["state"]["samples"] == 8 * 2 * 2  # steps x micro x workers
    # The learning rate logged is the one each step applied: warm-up 1/2 of the peak, then peak.
    assert uninterrupted["lr_history"][:2] == pytest.approx([1.5e-3, 3e-3])
    losses = uninterrupted["loss_history"]
    assert all(loss is not None for loss in losses)
    # Pinned at seed 0; the first is ~ln(1024), the demo tokenizer's vocabulary, at random init.
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4), f"{losses}"


def test_sigkilled_worker_restarts_in_the_same_job_and_matches_the_clean_run(
    hook: RayJobsHook, workdir: Path, prepared: str, uninterrupted: dict[str, Any]
) -> None:
    status, logs = _run(
        hook, workdir, prepared, "killed", "resilience-killed", faults="sigkill:rank=1:step=5"
    )
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resumed from step 4 of 8" in logs
    metrics = _metrics(str(workdir / "artifacts"), "killed")
    assert metrics["resumed_from_step"] == 4
    assert metrics["data_order"] == uninterrupted["data_order"]
    assert metrics["loss_history"] == pytest.approx(uninterrupted["loss_history"], abs=1e-5)
    # The resumed attempt read one step's blocks before its first step: no replay.
    assert metrics["first_step_reads"] == {"blocks_read": 2, "permutations_built": 1}
    # MLflow shows the checkpoints and the resume on the stage's run.
    from mlflow import MlflowClient

    result = json.loads((workdir / "artifacts" / "killed" / STAGE / "result.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    run_id = result["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["resumed_from_step"] == "4"
    saved = [m.step for m in client.get_metric_history(run_id, "checkpoint_step")]
    assert saved == [2, 4, 6, 8]
    # Ray Train may need more than one restart to rebuild the group; each resumed from step 4.
    resumes = {m.value for m in client.get_metric_history(run_id, "resumed_from_step")}
    assert resumes == {4.0}


def test_non_finite_losses_are_skipped_then_abort_without_a_bad_checkpoint(
    hook: RayJobsHook, workdir: Path, prepared: str, uninterrupted: dict[str, Any]
) -> None:
    status, logs = _run(
        hook,
        workdir,
        prepared,
        "nan",
        "resilience-nan",
        faults="nan_loss:rank=0:step=3;nan_loss:rank=1:step=5-8",
        **{"cpt.max_bad_steps": 2},
    )
    assert status == "FAILED"
    assert "3 steps in a row with a non-finite loss (steps 5-7)" in logs
    assert "aborted at step 7" in logs
    folder, names = _checkpoints(str(workdir / "artifacts"), "nan")
    assert "Last good checkpoint: " + storage.join(folder, "step-0000004") in logs
    assert [n for n in names if n.startswith("step-")] == ["step-0000002", "step-0000004"]
    saved = json.loads(Path(folder, "step-0000004", "loop_state.json").read_text())["state"]
    assert saved["skipped_steps"] == 1
    history = saved["history"]
    assert [h["skipped"] for h in history] == [False, False, True, False]
    # A skipped step applies no update; the schedule follows the step counter, so step 4 runs
    # step 4's learning rate, as the uninterrupted run did.
    assert history[3]["lr"] == pytest.approx(uninterrupted["lr_history"][3])
    assert history[1]["loss"] == pytest.approx(uninterrupted["loss_history"][1], abs=1e-5)
    assert not (workdir / "artifacts" / "nan" / STAGE / "model" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def s3_env(s3_server: dict[str, str]) -> Iterator[dict[str, str]]:
    """The S3 endpoint's environment, for this process and for the Ray jobs, and a bucket."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="checkpoints")
        yield s3_server


def test_on_s3_a_kill_mid_save_and_a_stopped_job_each_resume_from_the_last_complete_checkpoint(
    hook: RayJobsHook,
    workdir: Path,
    prepared: str,
    uninterrupted: dict[str, Any],
    s3_env: dict[str, str],
) -> None:
    """Three jobs of one run on S3: the first dies inside a checkpoint save; the second
    discards the half-written checkpoint, resumes before it, hangs at step 6 and is stopped
    (what an Airflow retry follows); the third resumes from step 6 and finishes the
    uninterrupted run's trajectory."""
    root = "s3://checkpoints/artifacts"
    overrides = {"storage.artifact_root": root, "compute.max_failures": 0}
    config_uri = _config_uri(workdir, "s3", **overrides)
    # Rank 1 dies after uploading its first shard of step 4: step 4 is on S3, but incomplete.
    _submit(
        hook,
        config_uri,
        "s3",
        prepared,
        "resilience-s3-1",
        {"PIPELINE_FAULTS": "sigkill_in_checkpoint:rank=1:step=4", **s3_env},
    )
    assert _wait(hook, "resilience-s3-1")[0] == "FAILED"
    folder, names = _checkpoints(root, "s3")
    assert names == ["latest", "step-0000002", "step-0000004"]
    assert storage.read_bytes(storage.join(folder, "latest")) == b"step-0000002"
    half = storage.list_children(storage.join(folder, "step-0000004"))
    # Rank 1 uploads its files in name order and died after the first, its RNG state.
    assert "_COMPLETE" not in half and "rank1_rng.pt" in half

    _submit(
        hook,
        config_uri,
        "s3",
        prepared,
        "resilience-s3-2",
        {"PIPELINE_FAULTS": "stall:rank=0:step=6", **s3_env},
    )
    latest = storage.join(folder, "latest")
    deadline = time.monotonic() + 300
    while storage.read_bytes(latest) != b"step-0000006":
        assert time.monotonic() < deadline, hook.get_job_logs("resilience-s3-2")[-3000:]
        time.sleep(0.5)
    hook.stop_job("resilience-s3-2")
    status, logs = _wait(hook, "resilience-s3-2")
    assert status == "STOPPED"
    assert "removed incomplete checkpoint step-0000004" in logs
    assert "resumed from step 2 of 8" in logs

    _submit(hook, config_uri, "s3", prepared, "resilience-s3-3", s3_env)
    status, logs = _wait(hook, "resilience-s3-3")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resumed from step 6 of 8" in logs
    metrics = _metrics(root, "s3")
    assert metrics["data_order"] == uninterrupted["data_order"]
    assert metrics["loss_history"] == pytest.approx(uninterrupted["loss_history"], abs=1e-5)
    assert _checkpoints(root, "s3")[1] == ["latest", "step-0000006", "step-0000008"]
