"""The preset families through the real stages on CPU: a Llama 2-style base (SentencePiece
tokenizer without ChatML tokens) and a tiny Mixtral (MoE under ZeRO-3), run as Ray jobs through
prepare_data (once: both bases share the tokenizer), continued_pretraining and
instruction_finetuning for a few steps, the two families' training jobs side by side."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

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


FAMILIES = ("llama", "mixtral")


def _run_stages(hook: RayJobsHook, jobs: dict[str, str]) -> None:
    """Submit every ``{submission_id: entrypoint}`` at once (the head fits two training jobs)
    and wait until all have succeeded."""
    for submission_id, entrypoint in jobs.items():
        hook.submit_job(entrypoint=entrypoint, submission_id=submission_id)
    waiting = set(jobs)
    deadline = time.monotonic() + 900
    while waiting and time.monotonic() < deadline:
        for submission_id in sorted(waiting):
            job = hook.get_job(submission_id)
            assert job is not None
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                assert job["status"] == "SUCCEEDED", hook.get_job_logs(submission_id)[-4000:]
                waiting.remove(submission_id)
        time.sleep(2)
    assert not waiting, f"{sorted(waiting)} did not finish in time"


def test_preset_families_train_through_the_real_stages(hook: RayJobsHook, tmp_path: Path) -> None:
    """Both families from the same prepared data (one tokenizer), their CPT jobs and then
    their SFT jobs running side by side."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.chat import render_segments

    lines = (REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text().splitlines()
    tok = llama2_style_tokenizer([json.loads(line)["text"] for line in lines[:300]], 600)
    args: dict[str, str] = {}
    for architecture in FAMILIES:
        base = save_base_model(tmp_path / f"base-{architecture}", architecture, tok, seq_len=128)
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
        args[architecture] = f"--config {write_resolved_config(config, key)} --run-key {key}"
    run_dirs = {arch: tmp_path / "artifacts" / f"preset-{arch}" for arch in FAMILIES}
    stage = "python -m pipeline.stages."
    # The data does not depend on the architecture: the bases share their tokenizer files.
    _run_stages(hook, {"preset-prepare": f"{stage}prepare_data {args['llama']}"})
    prepared = run_dirs["llama"] / "prepare_data"
    _run_stages(
        hook,
        {
            f"preset-{arch}-cpt": f"{stage}continued_pretraining {args[arch]} --input {prepared}"
            for arch in FAMILIES
        },
    )
    _run_stages(
        hook,
        {
            f"preset-{arch}-sft": f"{stage}instruction_finetuning {args[arch]} "
            f"--input {run_dirs[arch] / 'continued_pretraining'}"
            for arch in FAMILIES
        },
    )

    for architecture, run_dir in run_dirs.items():
        cpt, sft = (
            json.loads((run_dir / name / "result.json").read_text())["metrics"]
            for name in ("continued_pretraining", "instruction_finetuning")
        )
        assert (cpt["steps"], sft["steps"]) == (3, 2), architecture
        # A freshly initialised model over 602 tokens starts near ln(602) = 6.40 nats.
        assert cpt["first_loss"] == pytest.approx(math.log(602), abs=0.3), architecture
        assert cpt["final_loss"] < cpt["first_loss"], architecture

        exported = run_dir / "instruction_finetuning" / "model"
        model = AutoModelForCausalLM.from_pretrained(str(exported))
        assert model.config.model_type == architecture
        assert model.config.vocab_size == 602 and model.config.use_cache is True
        served = AutoTokenizer.from_pretrained(str(exported))
        assert len(served) == 602
        assert served.apply_chat_template(CONVERSATION, tokenize=False) == "".join(
            text for text, _ in render_segments(CONVERSATION, "chatml")
        )
