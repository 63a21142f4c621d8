"""The promote stage against a real ``mlflow server``: transformers-flavour versions, lineage
tags, the ``challenger``/``champion`` aliases, and an idempotent retry.

Three promote attempts run once for the module, in order: run key ``reg-a`` with every gate
passed, a retry of ``reg-a`` (as after a crash between registering and committing), and run
key ``reg-b`` whose domain gate failed. The tests below read what they left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import tracking
from pipeline.config import PipelineConfig, load_config
from pipeline.identity import code_version
from pipeline.models import fetch_model
from pipeline.stages import promote
from pipeline.stages.entrypoint import StageContext, StageOutput

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "it-registry"
PROMPT = "rides and deliveries"


@pytest.fixture(scope="module")
def config(mlflow_server: str) -> PipelineConfig:
    loaded = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "tracking.tracking_uri": mlflow_server,
            "tracking.ui_url": mlflow_server,
            "tracking.experiment": "it-registry",
            "tracking.registered_model": NAME,
            # The run that made the model trained SFT with LoRA (sft_model below).
            "sft.method": "lora",
            "sft.adapter.rank": 4,
        },
    )
    # The server chooses the artifact store and proxies it (mlflow-artifacts:/), as in production.
    tracking_cfg = loaded.tracking.model_copy(update={"artifact_location": None})
    return loaded.model_copy(update={"tracking": tracking_cfg})


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained with a LoRA adapter by the training recipe (one gloo rank), as a
    training stage exports it with ``adapter.merge: false``: the adapter and the tokenizer,
    no weights. Promote registers the full model it stands for."""
    from tests.trainer_harness import single_rank_group, tiny_config, train, write_inputs

    root = tmp_path_factory.mktemp("sft")
    inputs = write_inputs(root, chat_markers=True)
    lora = {
        "cpt.method": "lora",
        "cpt.adapter.rank": 4,
        "cpt.adapter.merge": False,
        "compute.precision": "fp32",
    }
    with single_rank_group():
        metrics = train(inputs, root / "trained", tiny_config(**lora))
    assert metrics["method"] == "lora"
    return root / "trained" / "model"


def _report(passed: bool) -> dict[str, Any]:
    gate = {"name": "domain_bits_per_byte", "metric": "domain.bits_per_byte", "passed": passed}
    general = {"name": "general_bits_per_byte", "metric": "general.bits_per_byte", "passed": True}
    candidate = {
        "domain": {"bits_per_byte": 1.25},
        "general": {"bits_per_byte": 2.5},
        "instructions": {"means": {"rouge_l": 0.375, "json_valid": None}},
    }
    return {"scores": {"candidate": candidate}, "passed": passed, "gates": [gate, general]}


def _promote(
    config: PipelineConfig, run_key: str, model: Path, tmp: Path, passed: bool
) -> tuple[StageOutput, str]:
    data = tmp / f"{run_key}-data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text(json.dumps({"sources_digest": f"digest-{run_key}"}))
    report = tmp / f"{run_key}-report.json"
    report.write_text(json.dumps(_report(passed)))
    with tracking.stage_run(config, run_key, "promote") as run_id:
        ctx = StageContext(
            stage="promote",
            config=config,
            run_key=run_key,
            output_uri=str(tmp / run_key),
            previous={"sft_model": str(model), "eval_report": str(report), "data": str(data)},
            mlflow_run_id=run_id,
        )
        return promote.run(ctx), run_id


@pytest.fixture(scope="module")
def attempts(
    config: PipelineConfig, sft_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[StageOutput, str]]:
    tmp = tmp_path_factory.mktemp("promote")
    assert tracking.champion_version(config.tracking) is None
    return {
        "first": _promote(config, "reg-a", sft_model, tmp, passed=True),
        "retry": _promote(config, "reg-a", sft_model, tmp, passed=True),
        "rejected": _promote(config, "reg-b", sft_model, tmp, passed=False),
    }


def test_first_run_registers_version_1_as_champion_and_challenger(
    config: PipelineConfig, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    out, run_id = attempts["first"]
    assert out.outputs == {"registered_model": NAME, "model_version": "1"}
    assert out.metrics == {"promoted": 1, "model_version": 1}
    assert out.skip_reason is None
    assert out.summary == [
        f"{NAME} version 1 registered",
        f"alias challenger -> {NAME} v1",
        f"alias champion -> {NAME} v1",
        "decision: promoted",
    ]
    version = tracking.client(config.tracking).get_model_version(NAME, "1")
    assert version.run_id == run_id and version.source.startswith("models:/m-")


def test_retry_with_same_run_key_reuses_the_version(
    config: PipelineConfig, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    out, _ = attempts["retry"]
    assert out.outputs["model_version"] == "1"
    assert (
        out.summary[0] == f"{NAME} version 1 found (registered by an earlier attempt of this run)"
    )
    mlc = tracking.client(config.tracking)
    tagged = mlc.search_model_versions(f"name = '{NAME}' and tags.`pipeline.run_key` = 'reg-a'")
    assert [v.version for v in tagged] == ["1"]
    assert sorted(int(v.version) for v in mlc.search_model_versions(f"name = '{NAME}'")) == [1, 2]


def test_failed_gate_registers_challenger_only_and_skips(
    config: PipelineConfig, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    out, _ = attempts["rejected"]
    assert out.outputs["model_version"] == "2"
    assert out.metrics == {"promoted": 0, "model_version": 2}
    assert out.skip_reason == "promotion refused: failed gates: domain_bits_per_byte"
    assert out.summary[1:] == [
        f"alias challenger -> {NAME} v2",
        "alias champion unchanged (stays on v1)",
        "decision: rejected (failed gates: domain_bits_per_byte)",
    ]
    mlc = tracking.client(config.tracking)
    assert mlc.get_model_version_by_alias(NAME, "challenger").version == "2"
    assert mlc.get_model_version_by_alias(NAME, "champion").version == "1"


def test_versions_carry_lineage_tags(
    config: PipelineConfig, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    mlc = tracking.client(config.tracking)
    tags = {v: mlc.get_model_version(NAME, v).tags for v in ("1", "2")}
    for version, run_key, passed in (("1", "reg-a", "true"), ("2", "reg-b", "false")):
        assert tags[version]["pipeline.run_key"] == run_key
        assert tags[version]["pipeline.data_digest"] == f"digest-{run_key}"
        assert tags[version]["pipeline.base_model"] == "scratch:tiny-llama"
        assert tags[version]["pipeline.config_fingerprint"] == config.fingerprint()
        assert tags[version]["pipeline.code_version"] == code_version()
        assert tags[version]["gates_passed"] == passed
        assert tags[version]["pipeline.cpt_method"] == "full"
        assert tags[version]["pipeline.sft_method"] == "lora"
        assert tags[version]["pipeline.sft_adapter"] == (
            "rank=4 alpha=32 dropout=0.05 "
            "target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
            "dora=false rslora=false train_chat_tokens=true"
        )
        assert "pipeline.cpt_adapter" not in tags[version]


def test_parent_runs_record_the_decision(
    config: PipelineConfig, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    mlc = tracking.client(config.tracking)
    promoted = mlc.get_run(tracking.parent_run_id(config.tracking, "reg-a"))
    rejected = mlc.get_run(tracking.parent_run_id(config.tracking, "reg-b"))
    assert promoted.info.status == "FINISHED"
    assert promoted.data.tags["pipeline.decision"] == "promoted"
    assert rejected.data.tags["pipeline.decision"] == "rejected"
    assert promoted.data.metrics == {
        "promoted": 1.0,
        "model_version": 1.0,
        "candidate.domain.bits_per_byte": 1.25,
        "candidate.general.bits_per_byte": 2.5,
        "candidate.instructions.rouge_l": 0.375,
    }
    assert rejected.data.metrics["promoted"] == 0.0


def test_champion_loads_with_the_transformers_flavour_and_generates(
    config: PipelineConfig, sft_model: Path, attempts: dict[str, tuple[StageOutput, str]]
) -> None:
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tracking.client(config.tracking)  # points mlflow's registry at the server
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    generated = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)
    merged = fetch_model(str(sft_model), config.tracking)  # the adapter on its base
    original = AutoModelForCausalLM.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = original.generate(ids, max_new_tokens=6, do_sample=False)
    assert len(expected[0]) == len(ids[0]) + 6
    assert generated[0]["generated_text"] == tok.decode(expected[0][len(ids[0]) :])


def test_champion_files_download_as_a_pretrained_folder(
    config: PipelineConfig,
    sft_model: Path,
    tmp_path: Path,
    attempts: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What evaluate loads the champion from: ``config.json``, weights and tokenizer in one
    folder, with the weights the candidate was trained to."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import MODEL_CACHE_ENV

    champion = tracking.champion_version(config.tracking)
    assert champion is not None
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    folders = {
        # What a stage given model.base = models:/<name>@champion trains or scores from.
        "by alias": fetch_model(f"models:/{NAME}@champion", config.tracking),
        "by version": Path(
            tracking.champion_model_dir(config.tracking, champion.version, str(tmp_path / "v"))
        ),
        "by source": Path(
            tracking.download_model_version(config.tracking, champion.source, str(tmp_path / "s"))
        ),
    }
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        merged = fetch_model(str(sft_model), config.tracking)
        expected = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    for how, folder in folders.items():
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, how
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        assert torch.equal(logits, expected), how
