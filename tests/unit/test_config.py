"""The config schema: loading, path resolution, errors that name field and line, overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import REPO_ROOT, ConfigError, PipelineConfig, load_config
from pipeline.planning.search import apply_plan

CONFIGS = REPO_ROOT / "configs"
DEMO = CONFIGS / "demo.yaml"
# The GPU presets: every config but the two that run the tiny model on CPU workers.
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in ("demo.yaml", "compose.yaml"))
# The fields `apply_plan` writes: a preset holds the planner's choice for each of them.
PLANNED_FIELDS = {
    "compute": (
        "zero_stage",
        "offload_optimizer",
        "offload_params",
        "activation_checkpointing",
        "checkpoint_every_n_layers",
    ),
    "cpt": ("micro_batch_size", "grad_accum_steps"),
    "sft": ("micro_batch_size", "grad_accum_steps"),
}

# A small config whose line numbers the tests rely on: keep it exactly as is.
BASE_YAML = """\
data:
  domain_corpus: data/domain.jsonl
  instructions: /abs/instructions.jsonl
  seq_len: 64
model:
  name: tiny
  hidden_size: 64
  num_heads: 4
  num_kv_heads: 2
cpt:
  max_steps: 10
  lr: 1.0e-3
  warmup_steps: 2
sft:
  max_steps: 5
  lr: 5.0e-4
compute:
  zero_stage: 3
  offload_optimizer: true
  attention: sdpa
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- the demo config and the presets -------------------------------------------------------


def test_demo_config_keeps_file_values_and_makes_paths_absolute() -> None:
    raw = yaml.safe_load(DEMO.read_text())
    config = load_config(DEMO)

    for section in ("cpt", "sft", "eval", "compute"):
        for key, value in raw[section].items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        assert getattr(config.model, key) == raw["model"][key]
    assert config.data.seq_len == raw["data"]["seq_len"]
    # The embedded default: built from config, on CPU, everything local.
    assert config.model.name == "tiny-llama"
    assert config.model.base is None and config.model.tokenizer is None
    assert config.compute.pool == "cpu"
    assert config.compute.precision == "fp32"
    # Data paths resolve against the config's folder, stores against the repository root.
    assert config.data.domain_corpus == str(CONFIGS / "demo_data" / "domain.jsonl")
    assert config.data.instructions == str(CONFIGS / "demo_data" / "instructions.jsonl")
    assert config.tracking.tracking_uri == f"sqlite:///{REPO_ROOT}/.local/mlflow/mlflow.db"
    assert config.tracking.artifact_location == str(REPO_ROOT / ".local" / "mlflow" / "artifacts")
    assert config.storage.artifact_root == str(REPO_ROOT / ".local" / "artifacts")


def test_relative_paths_resolve_against_the_config_folder_wherever_it_is(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE_YAML))
    assert config.data.domain_corpus == str(tmp_path / "data" / "domain.jsonl")
    assert config.data.instructions == "/abs/instructions.jsonl"


def test_there_are_production_presets() -> None:
    names = {p.name for p in PRESETS}
    assert {
        "llama3-8b-h100.yaml",
        "llama3-8b-a100.yaml",
        "llama2-70b-h100.yaml",
        "mixtral-8x7b-h100.yaml",
    } <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_targets_a_gpu_pool_with_remote_stores(preset: Path) -> None:
    config = load_config(preset)
    gpus_per_host = {"a100": 4, "h100": 8}[config.compute.pool]
    assert config.compute.num_workers % gpus_per_host == 0, "whole hosts only"
    assert config.compute.precision == "bf16"
    assert config.compute.attention == "auto"
    assert config.model.base is not None and config.model.base.startswith("s3://models/")
    assert config.data.domain_corpus.startswith("s3://")
    assert config.storage.artifact_root.startswith("s3://")
    assert config.tracking.tracking_uri.startswith("http://")
    assert config.tracking.artifact_location.startswith("s3://")
    # Remote URIs pass through path resolution untouched.
    raw = yaml.safe_load(preset.read_text())
    assert config.model.base == raw["model"]["base"]
    assert config.storage.artifact_root == raw["storage"]["artifact_root"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_holds_the_plan_the_planner_chooses_for_it(preset: Path) -> None:
    """ZeRO stage, offload, checkpointing and each stage's micro-batch are not picked by hand:
    a preset holds what ``apply_plan`` chooses for it, and that setting is predicted to fit."""
    config = load_config(preset)
    planned, document = apply_plan(config)
    differ = {
        f"{section}.{key}": (
            getattr(getattr(config, section), key),
            getattr(getattr(planned, section), key),
        )
        for section, keys in PLANNED_FIELDS.items()
        for key in keys
        if getattr(getattr(config, section), key) != getattr(getattr(planned, section), key)
    }
    assert differ == {}, (
        f"{preset.name} (configured, planned): {differ}; set the chosen row of "
        f"`pipeline plan configs/{preset.name}` in the file"
    )
    for section in ("cpt", "sft"):
        configured = document[section]["configured"]
        assert configured["fits"], f"{section}: {configured['why']}"


# --- unknown keys and bad values ------------------------------------------------------------


def test_names_that_stand_for_stages_and_metrics_are_checked_against_the_contract() -> None:
    with pytest.raises(ConfigError) as stage:
        load_config(DEMO, {"orchestration.stage_timeout_minutes": {"prepare_dta": 5}})
    assert "orchestration.stage_timeout_minutes" in str(stage.value)
    assert "unknown stage(s) ['prepare_dta']; expected some of ['prepare_data'," in str(stage.value)
    with pytest.raises(ConfigError) as metric:
        load_config(DEMO, {"eval.max_instruction_regression": {"rouge": 0.1}})
    assert "unknown metric(s) ['rouge']" in str(metric.value)
    assert "'judge_win_rate']" in str(metric.value)
    timeouts = {"evaluate": 30.0}
    assert (
        load_config(
            DEMO, {"orchestration.stage_timeout_minutes": timeouts}
        ).orchestration.stage_timeout_minutes
        == timeouts
    )


def test_unknown_key_names_key_allowed_keys_and_line(tmp_path: Path) -> None:
    text = BASE_YAML.replace("  seq_len: 64\n", "  seq_len: 64\n  seqlen: 128\n")
    message = error_of(write(tmp_path, text))
    assert "data.seqlen (line 5): unknown key" in message
    assert "'seq_len'" in message and "'chat_format'" in message and "'domain_corpus'" in message
    assert str(tmp_path / "config.yaml") in message


def test_unknown_section_lists_the_sections(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, BASE_YAML + "trainer:\n  steps: 1\n"))
    assert "trainer (line 21): unknown key" in message
    sections = (
        "['compute', 'cpt', 'data', 'eval', 'model', 'orchestration', 'sft', 'storage', 'tracking']"
    )
    assert sections in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  lr: 1.0e-3", "  lr: -1", "cpt.lr (line 12): Input should be greater than 0 (got -1)"),
        (
            "  zero_stage: 3",
            "  zero_stage: 5",
            "compute.zero_stage (line 18): Input should be 0, 1, 2 or 3 (got 5)",
        ),
        (
            "  attention: sdpa",
            "  attention: foo",
            "compute.attention (line 20): Input should be 'auto', 'flash_attention_2', "
            "'flex_attention', 'sdpa' or 'eager' (got 'foo')",
        ),
        (
            "  seq_len: 64",
            "  seq_len: 8",
            "data.seq_len (line 4): Input should be greater than or equal to 16 (got 8)",
        ),
        ("  name: tiny", "  name: -bad name", "model.name (line 6): String should match pattern"),
    ],
)
def test_bad_value_names_field_line_and_value(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert BASE_YAML.count(old + "\n") == 1
    message = error_of(write(tmp_path, BASE_YAML.replace(old + "\n", new + "\n")))
    assert "invalid config (1 error(s))" in message
    assert expected in message


def test_missing_required_field_points_at_its_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, BASE_YAML.replace("  max_steps: 5\n", "")))
    assert "sft.max_steps (line 14): Field required" in message


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE_YAML.replace("  lr: 1.0e-3\n", "  lr: 0\n")
    text = text.replace("  zero_stage: 3\n", "  zero_stage: 9\n")
    message = error_of(write(tmp_path, text))
    assert "invalid config (2 error(s))" in message
    assert "cpt.lr" in message and "compute.zero_stage" in message


# --- cross-field validators -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "  hidden_size: 64",
            "  hidden_size: 66",
            "model (line 5): Value error, hidden_size (66) must be divisible by num_heads (4)",
        ),
        (
            "  num_kv_heads: 2",
            "  num_kv_heads: 3",
            "model (line 5): Value error, num_heads (4) must be divisible by num_kv_heads (3)",
        ),
        (
            "  warmup_steps: 2",
            "  warmup_steps: 10",
            "cpt (line 10): Value error, warmup_steps (10) must be below max_steps (10)",
        ),
        (
            "  zero_stage: 3",
            "  zero_stage: 0",
            "compute (line 17): Value error, offload_optimizer needs zero_stage 1, 2 or 3",
        ),
    ],
)
def test_cross_field_rules(tmp_path: Path, old: str, new: str, expected: str) -> None:
    message = error_of(write(tmp_path, BASE_YAML.replace(old + "\n", new + "\n")))
    assert expected in message


def test_an_mlflow_server_needs_the_address_a_browser_opens() -> None:
    server = {"tracking.tracking_uri": "http://mlflow.mlops.svc:5000"}
    with pytest.raises(ConfigError) as err:
        load_config(REPO_ROOT / "configs" / "demo.yaml", server)
    assert "tracking: Value error, ui_url is required when tracking_uri is an MLflow server" in (
        str(err.value)
    )
    public = {**server, "tracking.ui_url": "https://mlflow.example.com"}
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", public)
    assert config.tracking.ui_url == "https://mlflow.example.com"


def test_zero_stage_0_is_fine_without_offload_in_fp32_only(tmp_path: Path) -> None:
    text = BASE_YAML.replace("  zero_stage: 3\n", "  zero_stage: 0\n").replace(
        "  offload_optimizer: true\n", "  offload_optimizer: false\n"
    )
    fp32 = {"compute.precision": "fp32"}
    assert load_config(write(tmp_path, text), fp32).compute.zero_stage == 0
    bf16 = {"compute.precision": "bf16"}
    with pytest.raises(ConfigError, match="accumulates and reduces gradients in bf16"):
        load_config(write(tmp_path, text), bf16)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"compute.cross_entropy": "fused", "compute.zero_stage": 3, "compute.pool": "h100"},
            "reads the whole LM head weight, which ZeRO-3 partitions",
        ),
        ({"compute.cross_entropy": "fused", "compute.zero_stage": 2}, "liger-kernel's CUDA"),
        ({"compute.compile_layers": True, "compute.zero_stage": 3}, "break the compiled graphs"),
        ({"compute.checkpoint_every_n_layers": 0}, "greater than or equal to 1"),
    ],
)
def test_speed_levers_that_cannot_run_together_are_refused(
    tmp_path: Path, overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, BASE_YAML), overrides)


# --- overrides ------------------------------------------------------------------------------


def test_override_applies_and_none_keeps_the_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML)
    config = load_config(path, {"cpt.max_steps": 5, "cpt.lr": None, "eval.batch_size": 3})
    assert config.cpt.max_steps == 5
    assert config.cpt.lr == 1.0e-3
    assert config.eval.batch_size == 3  # a section absent from the file is created
    assert load_config(path, {"cpt.max_steps": None}).cpt.max_steps == 10


def test_override_is_validated_and_blamed_on_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML)
    message = error_of(path, {"cpt.lr": -1})
    assert "cpt.lr (from override): Input should be greater than 0 (got -1)" in message
    message = error_of(path, {"cpt.bogus": 1})
    assert "cpt.bogus (from override): unknown key" in message
    assert "'max_steps'" in message
    # A cross-field rule broken by an override still names the section.
    assert "warmup_steps (2) must be below max_steps (2)" in error_of(path, {"cpt.max_steps": 2})


def test_record_field_names_nest_under_data_fields_and_the_former_keys_say_where(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, BASE_YAML)
    config = load_config(path, {"data.fields.text": "body", "data.fields.role": "from"})
    assert (config.data.fields.text, config.data.fields.role) == ("body", "from")
    assert config.data.fields.messages == "messages"  # the others keep their defaults
    message = error_of(path, {"data.text_field": "body", "data.role_field": "from"})
    assert (
        "record field names moved under data.fields: "
        "data.role_field -> data.fields.role, data.text_field -> data.fields.text"
    ) in message
    assert "data.fields.txt (from override): unknown key" in error_of(path, {"data.fields.txt": 1})
    assert "override 'data.seq_len.x': 'data.seq_len' is not a mapping" in error_of(
        path, {"data.seq_len.x": 1}
    )


def test_override_with_unknown_section_or_no_field_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML)
    message = error_of(path, {"trainer.steps": 1})
    assert "override 'trainer.steps': unknown section 'trainer'" in message
    assert "'compute'" in message and "'tracking'" in message
    assert "expected 'section.field'" in error_of(path, {"cpt": 1})


# --- files ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.yaml")
    assert message == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    assert "expected a mapping of sections" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "not valid YAML" in error_of(write(tmp_path, "data: [unclosed\n"))


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_stable_for_equal_configs_and_changes_with_any_field(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, BASE_YAML)
    first = load_config(path)
    fingerprint = first.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert load_config(path).fingerprint() == fingerprint
    # The same content under another key order is the same config.
    reordered = PipelineConfig.model_validate(dict(reversed(first.model_dump().items())))
    assert reordered.fingerprint() == fingerprint
    assert load_config(path, {"cpt.max_steps": 11}).fingerprint() != fingerprint
    assert load_config(path, {"sft.seed": 1}).fingerprint() != fingerprint
    assert load_config(path, {"compute.attention": "eager"}).fingerprint() != fingerprint


def test_a_config_error_shows_the_section_it_was_about_without_its_secrets() -> None:
    # A section-level check fails with the whole section as its input: the message, which
    # reaches task logs and the trigger form, shows it with credentials redacted.
    with pytest.raises(ConfigError) as err:
        load_config(
            CONFIGS / "demo.yaml",
            {
                "data.domain_corpus": "https://ingest:hunter2-Secret@data.example.com/d.jsonl",
                "data.pii_placeholders": {"bogus": "[x]"},
            },
        )
    message = str(err.value)
    assert "pii_placeholders has keys ['bogus']" in message
    assert "hunter2-Secret" not in message
    assert "https://***@data.example.com/d.jsonl" in message
