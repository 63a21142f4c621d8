"""Adapters through the real stages: Ray jobs of continued pre-training with LoRA and of
instruction fine-tuning with QLoRA on two gloo workers (DeepSpeed ZeRO-3, CPU optimizer
offload), on the demo data, in one run: CPT LoRA, then SFT QLoRA over CPT's merged model.

- LoRA CPT: the loss falls, the checkpoints hold the adapter only, and a worker SIGKILLed after
  a checkpoint resumes in the same job with the uninterrupted run's losses (1e-5);
- QLoRA SFT: trains over the 4-bit base, trains the chat tokens' rows and no other row, leaves
  every weight it does not target bit for bit as CPT exported it, and its merged model
  generates with transformers.
"""

from __future__ import annotations

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
CPT, SFT = "continued_pretraining", "instruction_finetuning"
SETTINGS = {
    "cpt.method": "lora",
    "cpt.max_steps": 4,
    "cpt.checkpoint_every": 2,
    "cpt.warmup_steps": 0,
    "cpt.micro_batch_size": 2,
    "cpt.lr": 0.01,
    "cpt.adapter.rank": 8,
    "sft.method": "qlora",
    "sft.max_steps": 3,
    "sft.warmup_steps": 0,
    "sft.lr": 0.01,
    "sft.adapter.rank": 8,
}
PINNED_CPT = [6.941074, 6.804864, 6.754973, 6.683665]
"""LoRA CPT losses at seed 0 over the demo model at random init (about ln(1024))."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter-stages")


def _config_uri(workdir: Path, run_key: str) -> str:
    base = {
        "storage.artifact_root": str(workdir / "artifacts"),
        "tracking.tracking_uri": f"sqlite:///{workdir}/mlflow.db",
        "tracking.artifact_location": str(workdir / "mlruns"),
    }
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", base | SETTINGS)
    return write_resolved_config(config, run_key)


@pytest.fixture(scope="module")
def prepared(workdir: Path) -> str:
    """prepare_data's output folder (in-process: it is not what these tests exercise)."""
    uri = _config_uri(workdir, "prep")
    stage_main("prepare_data", prepare_data.run, ["--config", uri, "--run-key", "prep"])
    return str(workdir / "artifacts" / "prep" / "prepare_data")


@pytest.fixture(scope="module")
def hook(ray_head: RayHead) -> Iterator[RayJobsHook]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_RAY_ADAPTERS", ray_head.airflow_conn_uri())
        yield RayJobsHook("ray_adapters")


def _run(
    hook: RayJobsHook, workdir: Path, stage: str, run_key: str, input_uri: str, faults: str = ""
) -> str:
    """Run ``stage`` as a Ray job; returns its logs (the job must succeed)."""
    entry = (
        f"python -m pipeline.stages.{stage} --config {_config_uri(workdir, run_key)} "
        f"--run-key {run_key} --input {input_uri}"
    )
    job_id = f"adapters-{run_key}-{stage}"
    hook.submit_job(
        entrypoint=entry,
        submission_id=job_id,
        runtime_env={"env_vars": {"PIPELINE_FAULTS": faults}},
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        job = hook.get_job(job_id)
        assert job is not None
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            logs = hook.get_job_logs(job_id)
            assert job["status"] == "SUCCEEDED", logs[-3000:]
            return logs
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in time")


def _model(workdir: Path, run_key: str, stage: str) -> Path:
    return workdir / "artifacts" / run_key / stage / "model"


def _metrics(workdir: Path, run_key: str, stage: str) -> dict[str, Any]:
    metrics: dict[str, Any] = storage.read_json(
        str(_model(workdir, run_key, stage) / "train_metrics.json")
    )
    return metrics


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.fixture(scope="module")
def cpt_clean(hook: RayJobsHook, workdir: Path, prepared: str) -> dict[str, Any]:
    logs = _run(hook, workdir, CPT, "clean", prepared)
    return _metrics(workdir, "clean", CPT) | {"logs": logs}


def test_lora_cpt_trains_the_adapter_with_small_checkpoints(
    cpt_clean: dict[str, Any], workdir: Path
) -> None:
    assert cpt_clean["method"] == "lora"
    assert cpt_clean["loss_history"] == pytest.approx(PINNED_CPT, abs=1e-5)
    assert "method lora: " in cpt_clean["logs"] and "parameters trained" in cpt_clean["logs"]
    assert cpt_clean["trainable_parameters"] < cpt_clean["parameters"] / 5
    # Each step checkpoint holds the adapter and its optimizer state, not the frozen base.
    series = Path(cpt_clean["checkpoint_uri"])
    saved = sum(f.stat().st_size for f in (series / "step-0000004").rglob("*.pt"))
    base = sum(
        f.stat().st_size
        for f in (workdir / "artifacts/clean" / CPT / "base_model").glob("*.safetensors")
    )
    assert saved < base / 2, (saved, base)
    assert (_model(workdir, "clean", CPT) / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_lora_worker_resumes_with_the_uninterrupted_losses(
    hook: RayJobsHook, workdir: Path, prepared: str, cpt_clean: dict[str, Any]
) -> None:
    logs = _run(hook, workdir, CPT, "killed", prepared, faults="sigkill:rank=1:step=3")
    assert "resumed from step 2 of 4" in logs
    metrics = _metrics(workdir, "killed", CPT)
    assert metrics["resumed_from_step"] == 2
    assert metrics["data_order"] == cpt_clean["data_order"]
    assert metrics["loss_history"] == pytest.approx(cpt_clean["loss_history"], abs=1e-5)
    killed = _tensors(_model(workdir, "killed", CPT) / "adapter")
    clean = _tensors(_model(workdir, "clean", CPT) / "adapter")
    assert killed.keys() == clean.keys()
    assert max(float((killed[k] - clean[k]).abs().max()) for k in clean) < 1e-5


def test_qlora_sft_over_the_lora_cpt_model_trains_the_chat_rows_and_generates(
    hook: RayJobsHook, workdir: Path, cpt_clean: dict[str, Any]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _run(hook, workdir, SFT, "clean", str(workdir / "artifacts/clean" / CPT))
    metrics = _metrics(workdir, "clean", SFT)
    assert metrics["method"] == "qlora"
    losses = metrics["loss_history"]
    assert losses[-1] < losses[0], losses
    cpt = _tensors(_model(workdir, "clean", CPT))
    sft_dir = _model(workdir, "clean", SFT)
    sft = _tensors(sft_dir)
    assert sft.keys() == cpt.keys()
    tok = AutoTokenizer.from_pretrained(str(sft_dir))
    chat = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    other = torch.ones(cpt["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    other[chat] = False
    for table in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(sft[table][other], cpt[table][other]), table
        assert not torch.allclose(sft[table][chat], cpt[table][chat]), table
    for name in cpt:
        if "norm" in name:
            assert torch.equal(sft[name], cpt[name]), name
    model = AutoModelForCausalLM.from_pretrained(str(sft_dir))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Where is my order?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
