"""``benchmarks/gpu_check.sh --small``: the one-call GPU check's code, run on CPU.

The check runs the project's ``train_worker`` in its own process for every row on a tiny fp32
model over gloo. This pins what the GPU run relies on: the rows that always run (packed logits,
op builds, the checkpoint resume) and their numbers, one row per lever, kernels the machine
lacks reported as skipped with a reason, real training rates, settings that change speed but
not the arithmetic, and a non-zero exit when a row fails.

It runs the way the GPU machine runs it: through the shell script (which finds the pinned
packages importable and installs nothing) with ray, mlflow, boto3 and airflow made absent, as
they are there.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "boto3", "botocore", "s3transfer", "airflow")
# A sitecustomize that makes packages look uninstalled (find_spec None, import fails), so that
# any import of them on the check's path, optional ones included, behaves as on the GPU machine.
ABSENT_SITECUSTOMIZE = """
import importlib.machinery, os, sys
ABSENT = set(os.environ["GPU_CHECK_TEST_ABSENT"].split(","))
class AbsentFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [
    AbsentFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path
]
"""
CHECK_ROWS = ["packed-logits", "fused-adam-build", "cpu-adam-build", "nccl-resume"]
RUNNABLE_ON_CPU = {
    "best",
    "method-lora",
    "method-qlora",
    "z3-ckpt",
    "z3-ckpt-offload",
    "ce-full",
    "ckpt-every",
    "ckpt-every2",
    "zero-0",
    "zero-2",
    "zero-3",
    "micro-4",
    "micro-16",
}
SKIPPED_ON_CPU = {"fused-adam-build", "attn-flash", "attn-flex", "ce-fused", "compile-on"}
SMALL_VOCAB = 512


def run_check(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """``gpu_check.sh --small ARGS`` with the GPU machine's absent packages absent; returns the
    exit code, the JSON report and the output."""
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(ABSENT_SITECUSTOMIZE)
    out = tmp / "report.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--small", "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=os.environ
        | {
            "GPU_CHECK_PYTHON": sys.executable,
            "GPU_CHECK_TEST_ABSENT": ",".join(ABSENT_ON_THE_GPU_MACHINE),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        }
        | (env or {}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, report, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one ``--small`` run (about a minute; more the first time DeepSpeed
    JIT-builds its CPU ops into ``~/.cache/torch_extensions``)."""
    code, result, output = run_check(tmp_path_factory.mktemp("gpu-check-small"))
    assert code == 0, output[-8000:]
    assert "installing from" not in output  # the pinned packages were importable already
    assert isinstance(result, dict)
    return result


def _rows(report: dict[str, Any], status: str | None = None) -> dict[str, dict[str, Any]]:
    return {r["row"]: r for r in report["rows"] if status in (None, r["status"])}


def test_the_absent_packages_are_absent_in_the_check(tmp_path: Path) -> None:
    """The fixture's run proves something only if its sitecustomize hides the packages."""
    (tmp_path / "sitecustomize.py").write_text(ABSENT_SITECUSTOMIZE)
    probe = "import importlib.util as u; print([u.find_spec(n) for n in ('mlflow', 'ray')])"
    env = os.environ | {"PYTHONPATH": str(tmp_path), "GPU_CHECK_TEST_ABSENT": "mlflow,ray"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[None, None]"


def test_every_row_once_checks_first(report: dict[str, Any]) -> None:
    keys = [r["row"] for r in report["rows"]]
    assert keys[:7] == [*CHECK_ROWS, "best", "z3-ckpt", "z3-ckpt-offload"]
    assert keys[-1] == "total"
    assert len(keys) == len(set(keys)) == len(CHECK_ROWS) + 17 + 1
    assert report["environment"]["backend"] == "gloo"


def test_every_runnable_row_trained_at_a_positive_rate(report: dict[str, Any]) -> None:
    ok = {k: r for k, r in _rows(report, "ok").items() if "tokens_per_s" in r}
    assert set(ok) == RUNNABLE_ON_CPU, _rows(report, "failed")
    for row in ok.values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["steps"] == 3
        assert row["mfu"] is None  # no peak FLOP/s is claimed for a CPU
    assert ok["z3-ckpt-offload"]["optimizer"] == "DeepSpeedCPUAdam"
    assert ok["zero-2"]["optimizer"] == "torch AdamW"
    assert [ok[k]["micro"] for k in ("micro-4", "best", "micro-16")] == [1, 2, 4]


def test_what_the_cpu_cannot_run_is_skipped_with_a_reason(report: dict[str, Any]) -> None:
    skipped = _rows(report, "skipped")
    assert set(skipped) == SKIPPED_ON_CPU
    assert all(row["reason"] for row in skipped.values())
    assert "CUDA" in skipped["attn-flex"]["reason"]
    assert "liger-kernel" in skipped["ce-fused"]["reason"]
    assert not _rows(report, "failed")


def test_settings_change_speed_and_memory_not_the_arithmetic(report: dict[str, Any]) -> None:
    """Same seed, data order and micro batch: ZeRO stage, offload, checkpointing and the loss
    kernel give the same loss before the first update, that of a fresh model (about ln(vocab)),
    and the same loss after three updates."""
    rows = [
        r
        for r in _rows(report, "ok").values()
        if r.get("micro") == 2 and r.get("method") == "full" and "first_loss" in r
    ]
    assert len(rows) == 9
    first = [r["first_loss"] for r in rows]
    final = [r["final_loss"] for r in rows]
    assert max(first) - min(first) < 1e-5
    assert max(final) - min(final) < 1e-4
    assert first[0] == pytest.approx(6.2473, abs=1e-4)
    assert first[0] == pytest.approx(math.log(SMALL_VOCAB), abs=0.1)
    assert 3.5 < report["segments_per_block"] < 5.5


def test_the_adapter_rows_train_a_lora_adapter_over_16_and_4_bit_weights(
    report: dict[str, Any],
) -> None:
    rows = _rows(report, "ok")
    best, lora, qlora = rows["best"], rows["method-lora"], rows["method-qlora"]
    assert (lora["method"], qlora["method"]) == ("lora", "qlora")
    # The adapter starts at zero: LoRA's first loss is the full model's, QLoRA's its NF4 copy's.
    assert lora["first_loss"] == pytest.approx(best["first_loss"], abs=1e-6)
    assert qlora["first_loss"] == pytest.approx(best["first_loss"], abs=0.05)
    assert qlora["first_loss"] != lora["first_loss"]
    assert lora["trainable_parameters"] == qlora["trainable_parameters"]
    assert lora["trainable_parameters"] < best["trainable_parameters"] / 3
    # No GPU: the planner plans host memory only, so no GPU figure to compare with.
    assert lora["predicted_peak_gib"] == 0.0
    assert any(line.startswith("method-lora: measured vs planned") for line in report["targets"])


def test_resume_continues_the_uninterrupted_run(report: dict[str, Any]) -> None:
    row = _rows(report)["nccl-resume"]
    assert row["status"] == "ok", row
    assert row["resumed_from_step"] == 1
    assert row["uninterrupted_losses"] == pytest.approx([6.2523, 6.2472], abs=1e-4)
    assert row["resumed_losses"] == pytest.approx(row["uninterrupted_losses"], abs=1e-5)
    assert row["lr_equal"]
    assert row["weights_moved"]["apart_share"] < 1e-6 < row["weights_moved"]["update_sum"]
    assert row["checkpoint_steps"] == [[1, 2], [2]]
    assert (row["zero_stage"], row["checkpointing"]) == (3, "1/1")


def test_packed_logits_equal_each_document_alone(report: dict[str, Any]) -> None:
    row = _rows(report)["packed-logits"]
    assert row["status"] == "ok", row
    for kernel in ("sdpa", "eager"):
        assert row["kernels"][kernel]["max_abs_diff"] < 1e-6
    assert row["kernels"]["flex_attention"]["skipped"]
    assert row["kernels"]["flash_attention_2"]["skipped"]
    # The check can see a leak: attending across documents moves the logits by ~0.7.
    assert row["leak_max_abs_diff"] > 1000 * row["tolerance"]


def test_optimizer_builds(report: dict[str, Any]) -> None:
    rows = _rows(report)
    assert rows["cpu-adam-build"]["status"] == "ok" and rows["cpu-adam-build"]["build_s"] >= 0
    assert "CUDA" in rows["fused-adam-build"]["reason"]


def test_a_failing_row_fails_the_check(tmp_path: Path) -> None:
    """A real failure: the loop's own fault injection makes every loss NaN, so its guard aborts
    the best row's run after max_bad_steps (3) skipped steps. With no budget the lever rows are
    skipped, and the rows that always run still run."""
    code, result, output = run_check(
        tmp_path,
        "--steps",
        "5",
        "--budget-s",
        "0",
        env={"PIPELINE_FAULTS": "nan_loss:rank=0:step=1-9"},
    )
    assert code == 1, output[-8000:]
    rows = _rows(result)
    assert rows["best"]["status"] == "failed"
    assert "non-finite" in rows["best"]["error"]
    assert "FAILED best" in output
    assert rows["nccl-resume"]["status"] == "failed"  # no step applied, nothing to resume from
    assert rows["packed-logits"]["status"] == "ok"
    levers = [r for k, r in rows.items() if k not in {*CHECK_ROWS, "best", "total"}]
    budget = [r for r in levers if r["reason"].startswith("budget")]
    assert len(budget) == len(RUNNABLE_ON_CPU) - 1
