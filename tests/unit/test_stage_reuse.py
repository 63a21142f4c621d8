"""Stage results carry their identity (config, inputs, code), and only an identical attempt
reuses a committed result; a job running other code than Airflow resolved with fails fast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.identity import code_version, result_digest, write_resolved_config
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite MLflow store for the module (creating one takes seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def resolved_config(tmp_path: Path, mlflow_store: Path) -> str:
    """configs/demo.yaml resolved into a fresh artifact root and the module's MLflow store."""
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "storage.artifact_root": str(tmp_path / "artifacts"),
            "tracking.tracking_uri": f"sqlite:///{mlflow_store}/mlflow.db",
            "tracking.artifact_location": str(mlflow_store / "mlruns"),
        },
    )
    return write_resolved_config(config, "reuse-run")


class CountingStage:
    """A stage that writes one file and counts how often it really ran."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __call__(self, ctx: StageContext) -> StageOutput:
        self.calls += 1
        out = Path(ctx.output_uri)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.txt").write_text(f"{self.name} attempt {self.calls}")
        return StageOutput(outputs={self.name: str(out / "data.txt")}, metrics={"n": self.calls})


def _run(stage: CountingStage, config: str, *extra: str) -> dict[str, Any]:
    args = ["--config", config, "--run-key", "reuse-run", "--code-version", code_version()]
    return stage_main(stage.name, stage, [*args, *extra])


def test_identical_attempt_reuses_and_changed_data_reruns(resolved_config: str) -> None:
    first = CountingStage("first")
    a = _run(first, resolved_config, "--inputs-fingerprint", "data-v1")
    assert (first.calls, a["input_digest"], a["code_version"]) == (1, "data-v1", code_version())
    assert a["result_digest"] == result_digest(a["config_fingerprint"], a["outputs"], "data-v1")
    assert _run(first, resolved_config, "--inputs-fingerprint", "data-v1") == a
    assert first.calls == 1  # reused
    b = _run(first, resolved_config, "--inputs-fingerprint", "data-v2")
    assert first.calls == 2
    assert b["input_digest"] == "data-v2"
    assert b["result_digest"] != a["result_digest"]


def test_a_rerun_that_dies_part_way_leaves_no_commit_standing(resolved_config: str) -> None:
    from pipeline import storage

    first = CountingStage("first")
    a = _run(first, resolved_config, "--inputs-fingerprint", "data-v1")
    assert storage.committed_result(a["output_uri"]) == a

    def dies_part_way(ctx: StageContext) -> StageOutput:
        (Path(ctx.output_uri) / "data.txt").write_text("half of attempt 2")
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        stage_main("first", dies_part_way, ["--config", resolved_config, "--run-key",
                   "reuse-run", "--code-version", code_version(), "--inputs-fingerprint",
                   "data-v2"])  # fmt: skip
    # The old marker went before the rewrite: nothing claims the half-new folder.
    assert storage.committed_result(a["output_uri"]) is None
    b = _run(first, resolved_config, "--inputs-fingerprint", "data-v2")
    assert first.calls == 2 and b["input_digest"] == "data-v2"


def test_downstream_input_digest_is_the_upstream_result_digest(resolved_config: str) -> None:
    up, down = CountingStage("up"), CountingStage("down")
    u1 = _run(up, resolved_config, "--inputs-fingerprint", "data-v1")
    d1 = _run(down, resolved_config, "--input", u1["output_uri"])
    assert d1["input_digest"] == u1["result_digest"]
    assert d1["outputs"] == {**u1["outputs"], "down": d1["outputs"]["down"]}
    _run(down, resolved_config, "--input", u1["output_uri"])
    assert down.calls == 1  # same upstream: reused
    # Upstream rerun on new data: its digest changes, so downstream runs again.
    u2 = _run(up, resolved_config, "--inputs-fingerprint", "data-v2")
    d2 = _run(down, resolved_config, "--input", u2["output_uri"])
    assert down.calls == 2
    assert d2["input_digest"] == u2["result_digest"] != u1["result_digest"]


def test_code_version_is_a_hash_of_the_package_source() -> None:
    version = code_version()
    assert version.startswith("0.1.0+src.")
    # The same code gives the same version in a fresh interpreter (as in a Ray job).
    out = subprocess.run(
        [sys.executable, "-c", "from pipeline.identity import code_version as v; print(v())"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert out.stdout.strip() == version


def test_a_job_with_other_code_exits_2_naming_both_versions(resolved_config: str) -> None:
    airflow_version = "0.1.0+src.0123456789"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.prepare_data",
            *("--config", resolved_config, "--run-key", "reuse-run"),
            *("--code-version", airflow_version),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"this run was resolved with pipeline {airflow_version}" in out.stderr
    assert f"this Ray job runs pipeline {code_version()}" in out.stderr
    assert "clear its resolve_config task with Downstream" in out.stderr
    # Nothing was written: the check comes before any work.
    assert not (Path(resolved_config).parent / "prepare_data").exists()
