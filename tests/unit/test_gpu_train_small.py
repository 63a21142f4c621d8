"""``benchmarks/gpu_train.py --small``: the GPU benchmark's code path, run on CPU.

The script runs the project's ``train_worker`` in its own process for every setting of the GPU
matrix on a tiny fp32 model, then compares packed logits with per-document logits. This pins
what the GPU run relies on: one row per setting, kernels the machine lacks reported as skipped
with a reason, real training rates, and document isolation on the CPU kernels.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_train.py"
RUNNABLE_ON_CPU = {
    "z2-sdpa",
    "z2-sdpa-ckpt",
    "z3-sdpa-ckpt",
    "z3-offload-sdpa-ckpt",
    "z2-sdpa-micro8",
}
SKIPPED_ON_CPU = {"z2-flex-ckpt", "z2-flash-ckpt"}
SMALL_VOCAB = 512


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one ``--small`` run (about 20 s; more the first time DeepSpeed
    JIT-builds its CPU Adam into ``~/.cache/torch_extensions``)."""
    out = tmp_path_factory.mktemp("gpu-train-small") / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(Path(out).read_text())
    return result


def _rows(report: dict[str, Any], status: str) -> dict[str, dict[str, Any]]:
    return {r["setting"]: r for r in report["results"] if r["status"] == status}


def test_every_runnable_setting_trained_once_at_a_positive_rate(report: dict[str, Any]) -> None:
    settings = [r["setting"] for r in report["results"]]
    assert len(settings) == len(set(settings)) == len(RUNNABLE_ON_CPU | SKIPPED_ON_CPU)
    ok = _rows(report, "ok")
    assert set(ok) == RUNNABLE_ON_CPU, [r for r in report["results"] if r["status"] == "failed"]
    for row in ok.values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["steps"] == report["shape"]["steps"] == 3
        assert row["mfu"] is None  # no peak FLOP/s is claimed for a CPU


def test_kernels_the_cpu_cannot_run_are_skipped_with_a_reason(report: dict[str, Any]) -> None:
    skipped = _rows(report, "skipped")
    assert set(skipped) == SKIPPED_ON_CPU
    assert all(row["reason"] for row in skipped.values())


def test_settings_change_speed_and_memory_not_the_first_loss(report: dict[str, Any]) -> None:
    """Same seed, data order and micro batch: ZeRO stage, offload and checkpointing must give
    the same loss before the first update, that of a fresh model (about ln(vocab))."""
    first = [r["first_loss"] for r in _rows(report, "ok").values() if r["micro"] == 2]
    assert len(first) == 4
    assert max(first) - min(first) < 1e-5
    assert first[0] == pytest.approx(math.log(SMALL_VOCAB), abs=0.1)


def test_packed_logits_equal_per_document_logits_on_cpu_kernels(report: dict[str, Any]) -> None:
    assert 3.5 < report["segments_per_block"] < 5.5
    check = report["packed_equality"]
    for kernel in ("sdpa", "eager"):
        assert check[kernel]["segments"] >= 2 * 3
        assert check[kernel]["max_abs_diff"] < 1e-4
    for kernel in ("flex_attention", "flash_attention_2"):
        assert check[kernel]["skipped"]
