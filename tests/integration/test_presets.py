"""The preset families through the real stages on CPU: a Llama 2-style base (SentencePiece
tokenizer without ChatML tokens) and a tiny Mixtral (MoE under ZeRO-3), each run as Ray jobs
through prepare_data, continued_pretraining and instruction_finetuning for a few steps."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.devstack.ray_cluster import RayHead
from pipeline.identity import write_resolved_config
from ray_jobs.hooks import RayJobsHook
from tests.tiny_presets import llama2_style_tokenizer, save_base_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
REPO_ROOT = Path(__file__).resolve().parents[2]
CONVERSATION = [
    {"role": "user", "content": "Where is my pad thai?"},
    {"role": "assistant", "content": "The courier was delayed by traffic."},
]


@pytest.fixture()
def hook(ray_head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayJobsHook:
    monkeypatch.setenv("AIRFLOW_CONN_RAY_STAGE", ray_head.airflow_conn_uri())
    return RayJobsHook("ray_stage")


def _run_stage(hook: RayJobsHook, stage: str, args: str, submission_id: str) -> dict[str, Any]:
    hook.submit_job(
        entrypoint=f"python -m pipeline.stages.{stage} {args}", submission_id=submission_id
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        job = hook.get_job(submission_id)
        assert job is not None
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert job["status"] == "SUCCEEDED", hook.get_job_logs(submission_id)[-4000:]
            return job
        time.sleep(2)
    raise AssertionError(f"{stage} did not finish in time")


@pytest.mark.parametrize("architecture", ["llama", "mixtral"])
def test_preset_family_trains_through_the_real_stages(
    architecture: str, hook: RayJobsHook, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.chat import render_segments

    lines = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    tok = llama2_style_tokenizer([json.loads(line)["text"] for line in lines[:300]], 600)
    base = save_base_model(tmp_path / "base", architecture, tok, seq_len=128)  # type: ignore[arg-type]
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "model.base": str(base),
            "data.seq_len": 128,
            "cpt.max_steps": 3,
            "cpt.warmup_steps": 0,
            "sft.max_steps": 2,
            "sft.warmup_steps": 0,
            "compute.num_workers": 2,
            "compute.zero_stage": 3,
            "storage.artifact_root": str(tmp_path / "artifacts"),
            "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "tracking.artifact_location": str(tmp_path / "mlruns"),
        },
    )
    key = f"preset-{architecture}"
    args = f"--config {write_resolved_config(config, key)} --run-key {key}"
    run_dir = tmp_path / "artifacts" / key
    _run_stage(hook, "prepare_data", args, f"{key}-prepare")
    _run_stage(
        hook, "continued_pretraining", f"{args} --input {run_dir / 'prepare_data'}", f"{key}-cpt"
    )
    _run_stage(
        hook,
        "instruction_finetuning",
        f"{args} --input {run_dir / 'continued_pretraining'}",
        f"{key}-sft",
    )

    cpt = json.loads((run_dir / "continued_pretraining" / "result.json").read_text())["metrics"]
    sft = json.loads((run_dir / "instruction_finetuning" / "result.json").read_text())["metrics"]
    assert (cpt["steps"], sft["steps"]) == (3, 2)
    # A freshly initialised model over 602 tokens starts near ln(602) = 6.40 nats.
    assert cpt["first_loss"] == pytest.approx(math.log(602), abs=0.3)
    assert cpt["final_loss"] < cpt["first_loss"]

    exported = run_dir / "instruction_finetuning" / "model"
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.config.model_type == architecture
    assert model.config.vocab_size == 602 and model.config.use_cache is True
    served = AutoTokenizer.from_pretrained(str(exported))
    assert len(served) == 602
    assert served.apply_chat_template(CONVERSATION, tokenize=False) == "".join(
        text for text, _ in render_segments(CONVERSATION, "chatml")
    )
