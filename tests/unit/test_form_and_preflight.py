"""Trigger form from the config schema, run keys and input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT, ConfigError, PipelineConfig, load_config
from pipeline.form import FORM_FIELDS, field_schema, form_fields
from pipeline.preflight import check_inputs, run_key

DEMO = REPO_ROOT / "configs" / "demo.yaml"


# --- field_schema / form_fields ----------------------------------------------------------


def test_numeric_fields_are_nullable_and_carry_the_schema_bounds() -> None:
    assert field_schema("cpt.lr") == {
        "type": ["null", "number"],
        "exclusiveMinimum": 0,
        "maximum": 1.0,
        "description": "Peak learning rate.",
    }
    seq_len = field_schema("data.seq_len")
    assert seq_len["type"] == ["null", "integer"]
    assert (seq_len["minimum"], seq_len["maximum"]) == (16, 131072)
    assert field_schema("eval.min_improvement")["minimum"] == 0
    assert field_schema("compute.num_workers")["minimum"] == 1


def test_literal_fields_become_enums_that_include_none() -> None:
    pool = field_schema("compute.pool")
    assert pool["enum"] == [None, "cpu", "a100", "h100"]
    assert "type" not in pool  # the enum alone says what is allowed
    assert field_schema("compute.zero_stage")["enum"] == [None, 0, 1, 2, 3]
    assert field_schema("compute.attention")["enum"] == [
        None,
        "auto",
        "flash_attention_2",
        "flex_attention",
        "sdpa",
        "eager",
    ]


def test_booleans_are_three_way_selects_and_descriptions_plain_text() -> None:
    # A switch cannot show "unset": the form draws an enum without a type as a select.
    offload = field_schema("compute.offload_optimizer")
    assert offload["enum"] == [None, True, False]
    assert "type" not in offload
    corpus = field_schema("data.domain_corpus")
    assert corpus["type"] == ["null", "string"]
    assert "\n" not in corpus["description"]
    assert "  " not in corpus["description"]
    assert corpus["description"].startswith("JSONL file (local path or s3:// URI) of domain")
    assert "(data/*.jsonl), folders and s3:// prefixes" in corpus["description"]  # no ``


def test_form_fields_cover_the_form_and_mention_demo_values() -> None:
    fields = form_fields(DEMO)
    assert tuple(fields) == FORM_FIELDS
    demo = yaml.safe_load(DEMO.read_text())
    assert fields["cpt.lr"]["description"] == (
        f"Peak learning rate. Empty keeps demo.yaml's value: {demo['cpt']['lr']}."
    )
    assert fields["data.domain_corpus"]["description"].endswith(
        f"Empty keeps demo.yaml's value: {demo['data']['domain_corpus']}."
    )
    assert fields["compute.zero_stage"]["description"].endswith(
        f"Empty keeps demo.yaml's value: {demo['compute']['zero_stage']}."
    )
    # A field the file does not set keeps the schema default.
    assert "eval" not in demo or "min_improvement" not in demo["eval"]
    assert fields["eval.min_improvement"]["description"].endswith("Empty keeps the default: 0.0.")


def test_form_fields_are_titled_grouped_and_label_the_empty_choice() -> None:
    fields = form_fields(DEMO)
    assert [fields[f]["title"] for f in ("cpt.max_steps", "sft.lr", "compute.zero_stage")] == [
        "CPT max steps",
        "SFT learning rate",
        "ZeRO stage",
    ]
    sections = [fields[f]["section"] for f in FORM_FIELDS]
    assert sections[:3] == ["Data"] * 3 and sections[-1] == "Evaluation gates"
    assert sections.count("Compute") == 5
    assert sections.count("Instruction fine-tuning") == 4
    # Keys as the browser spells String(value); the empty choice names the value it keeps.
    assert fields["compute.offload_optimizer"]["values_display"] == {
        "null": "(keep demo.yaml's value: on)",
        "true": "on",
        "false": "off",
    }
    assert fields["compute.zero_stage"]["values_display"]["null"] == "(keep demo.yaml's value: 3)"
    assert fields["compute.attention"]["values_display"]["sdpa"] == "sdpa"


def test_the_form_chooses_each_section_s_method_and_its_adapter_rank(tmp_path: Path) -> None:
    fields = form_fields(DEMO)
    assert fields["sft.method"]["enum"] == [None, "full", "lora", "qlora"]
    assert fields["sft.method"]["values_display"]["null"] == "(keep the default: full)"
    assert fields["sft.method"]["section"] == "Instruction fine-tuning"
    rank = fields["cpt.adapter.rank"]
    assert (rank["type"], rank["minimum"], rank["maximum"]) == (["null", "integer"], 1, 1024)
    assert rank["title"] == "CPT LoRA rank" and rank["section"] == "Continued pre-training"
    assert rank["description"].endswith("Empty keeps the default: 16.")
    # A nested value set in the file is the one an empty field keeps.
    config = tmp_path / "lora.yaml"
    raw = yaml.safe_load(DEMO.read_text())
    raw["sft"] |= {"method": "lora", "adapter": {"rank": 64}}
    config.write_text(yaml.safe_dump(raw))
    fields = form_fields(config)
    assert fields["sft.adapter.rank"]["description"].endswith("Empty keeps lora.yaml's value: 64.")
    assert fields["sft.method"]["values_display"]["null"] == "(keep lora.yaml's value: lora)"


def test_form_fields_without_a_config_file_show_the_schema_defaults(tmp_path: Path) -> None:
    fields = form_fields(tmp_path / "missing.yaml")
    assert fields["cpt.lr"]["description"] == "Peak learning rate."  # required: no default
    assert fields["compute.zero_stage"]["values_display"]["null"] == "(keep the default: 3)"


# --- run_key -----------------------------------------------------------------------------


def test_run_key_sanitizes_an_airflow_run_id() -> None:
    key = run_key("domain_llm", "manual__2026-11-29T19:31:21.148200+00:00")
    # Readable, then a digest of the exact names (pinned: a change moves every run's folder).
    assert key == "domain_llm__manual__2026-11-29T19-31-21.148200-00-00-adae05dd"
    assert "/" not in key and ":" not in key and "+" not in key
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", key)


def test_run_key_is_deterministic_and_distinguishes_runs() -> None:
    a = run_key("domain_llm", "scheduled__2026-11-29T00:00:00+00:00")
    assert a == run_key("domain_llm", "scheduled__2026-11-29T00:00:00+00:00")
    assert a != run_key("domain_llm", "scheduled__2026-11-30T00:00:00+00:00")
    assert a != run_key("other_dag", "scheduled__2026-11-29T00:00:00+00:00")


def test_run_key_replaces_runs_of_unsafe_characters_once() -> None:
    assert run_key("my dag", "a/b::c  d") == "my-dag__a-b-c-d-74461cee"
    assert run_key("dag", "+x+") == "dag__-x-41cd4804"  # only the outer dashes are stripped


# --- check_inputs ------------------------------------------------------------------------


def _config(tmp_path: Path, **data: str) -> PipelineConfig:
    raw = {
        "data": {"domain_corpus": "domain.jsonl", "instructions": "chats.jsonl", **data},
        "model": {"name": "tiny"},
        "cpt": {"max_steps": 2, "lr": 1e-3},
        "sft": {"max_steps": 2, "lr": 1e-3},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_check_inputs_names_the_missing_domain_corpus(tmp_path: Path) -> None:
    (tmp_path / "chats.jsonl").write_text("{}\n")
    config = _config(tmp_path)
    missing = tmp_path / "domain.jsonl"
    with pytest.raises(
        ConfigError, match=re.escape(f"data.domain_corpus: file not found: {missing}")
    ):
        check_inputs(config)


def test_check_inputs_names_the_missing_instructions(tmp_path: Path) -> None:
    (tmp_path / "domain.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"^data\.instructions: file not found: "):
        check_inputs(_config(tmp_path))


def test_check_inputs_passes_when_files_exist(tmp_path: Path) -> None:
    (tmp_path / "domain.jsonl").write_text("{}\n")
    (tmp_path / "chats.jsonl").write_text("{}\n")
    assert check_inputs(_config(tmp_path)) == {
        "data.domain_corpus": [str(tmp_path / "domain.jsonl")],
        "data.instructions": [str(tmp_path / "chats.jsonl")],
    }


def test_check_inputs_rejects_a_base_model_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "domain.jsonl").write_text("{}\n")
    (tmp_path / "chats.jsonl").write_text("{}\n")
    (tmp_path / "base").mkdir()
    config = _config(tmp_path)
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"base": str(tmp_path / "base")})}
    )
    with pytest.raises(ConfigError, match=r"model\.base: no Hugging Face model files found at"):
        check_inputs(config)
    (tmp_path / "base" / "config.json").write_text("{}")
    check_inputs(config)


def test_demo_config_inputs_exist() -> None:
    check_inputs(load_config(DEMO))


def test_plan_auto_is_applied_before_any_job_and_logged_to_the_parent_run(tmp_path: Path) -> None:
    """The first task replaces the compute settings with the plan, writes them into the
    resolved config every Ray job reads, and attaches the plan to the MLflow parent run."""
    from mlflow import MlflowClient

    from pipeline.identity import read_resolved_config
    from pipeline.preflight import resolve_run

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {
        "compute.plan": "auto",
        "storage.artifact_root": str(tmp_path / "artifacts"),
        "tracking.tracking_uri": tracking_uri,
        "tracking.artifact_location": str(tmp_path / "mlruns"),
    }
    resolved = resolve_run(str(REPO_ROOT / "configs" / "demo.yaml"), overrides, "plan-run")
    chosen = resolved["plan"]["cpt"]
    config = read_resolved_config(resolved["config_uri"])
    assert (config.compute.zero_stage, config.compute.offload_optimizer) == (
        chosen["zero_stage"],
        chosen["offload_optimizer"],
    )
    assert config.compute.activation_checkpointing == chosen["activation_checkpointing"]
    assert config.cpt.micro_batch_size == chosen["micro_batch_size"]
    # The global batch is the plan's to keep: micro x accum unchanged for both sections.
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    for section in ("cpt", "sft"):
        before, after = getattr(demo, section), getattr(config, section)
        assert after.micro_batch_size * after.grad_accum_steps == (
            before.micro_batch_size * before.grad_accum_steps
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id]
    )
    assert "plan.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    logged = parent.data.metrics["plan.cpt.predicted_step_time_s"]
    assert logged == pytest.approx(chosen["step_time_s"])


# --- resolve_run: what the first task hands to the stages ---------------------------------


def _demo_overrides(tmp_path: Path, data: Path | None = None) -> dict[str, object]:
    overrides: dict[str, object] = {
        "storage.artifact_root": str(tmp_path / "artifacts"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.artifact_location": str(tmp_path / "mlruns"),
        "tracking.ui_url": "http://mlflow.example:5000",
    }
    if data is not None:
        overrides["data.domain_corpus"] = str(data)
    return overrides


def test_resolve_run_returns_code_version_jobs_and_the_parent_run_url(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.identity import code_version
    from pipeline.preflight import STAGES, resolve_run

    resolved = resolve_run(str(DEMO), _demo_overrides(tmp_path), "keys-run")
    assert resolved["code_version"] == code_version()
    assert re.fullmatch(r"0\.1\.0\+src\.[0-9a-f]{10}", resolved["code_version"])
    assert re.fullmatch(r"[0-9a-f]{16}", resolved["inputs_fingerprint"])
    jobs = resolved["jobs"]
    assert list(jobs) == list(STAGES)
    assert jobs["continued_pretraining"] == {
        "timeout_s": 4320 * 60.0,
        "entrypoint_num_cpus": 1.0,
        "entrypoint_memory": 2 * 1024**3,
        "entrypoint_resources": {},
        "runtime_env": {},
        "transient_error_budget_s": 600.0,
        "stop_wait_s": 180.0,
    }
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("domain-llm")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.data.tags["pipeline.role"] == "parent"
    assert resolved["mlflow_run_url"] == (
        f"http://mlflow.example:5000/#/experiments/{experiment.experiment_id}"
        f"/runs/{parent.info.run_id}?workflowType=machine_learning"
    )


def test_inputs_fingerprint_follows_the_data_files_and_the_config(tmp_path: Path) -> None:
    from pipeline.preflight import resolve_run

    data = tmp_path / "domain.jsonl"
    data.write_text((REPO_ROOT / "configs" / "demo_data" / "domain.jsonl").read_text())
    overrides = _demo_overrides(tmp_path, data)
    first = resolve_run(str(DEMO), overrides, "fp-run")["inputs_fingerprint"]
    assert resolve_run(str(DEMO), overrides, "fp-run")["inputs_fingerprint"] == first
    with data.open("a") as f:
        f.write('{"text": "one more document"}\n')
    changed_data = resolve_run(str(DEMO), overrides, "fp-run")["inputs_fingerprint"]
    assert changed_data != first
    changed_config = resolve_run(str(DEMO), {**overrides, "cpt.max_steps": 31}, "fp-run")
    assert changed_config["inputs_fingerprint"] not in (first, changed_data)
