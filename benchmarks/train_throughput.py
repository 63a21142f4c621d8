"""Training throughput of the project's DeepSpeed trainer, run through Ray Train on CPU workers.

Runs the real stage entrypoints (``prepare_data`` once, then ``continued_pretraining`` once per
setting) on ``configs/demo.yaml`` against a private, token-authenticated Ray head, and reports
tokens/s, seconds per optimizer step, first -> final loss and wall time for a small matrix of
ZeRO stage, optimizer offload and activation checkpointing. A short warm-up run goes first so
that DeepSpeed's one-time JIT build of ``cpu_adam`` (cached in ``~/.cache/torch_extensions``) and
cold imports do not land in the table.

Then the SFT comparison of ``sft_vs_hf_trainer.py``: the packed trainer against the Hugging Face
``Trainer`` on generated chats of heavy-tailed lengths, and the ratio of their target tokens/s.

    .venv/bin/python benchmarks/train_throughput.py            # full matrix + SFT comparison
    .venv/bin/python benchmarks/train_throughput.py --quick    # one setting + SFT comparison

Prints Markdown tables and writes JSON (default ``benchmarks/results/train_throughput.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path.
from sft_vs_hf_trainer import SFT_SEQ_LEN, SFT_STEPS, sft_comparison, sft_table
from stage_runs import (
    DEMO_CONFIG,
    WARMUP_STEPS,
    PeakRss,
    bench_config,
    environment,
    private_ray,
    run_stage,
)

from pipeline import storage
from pipeline.config import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "train_throughput.json"
DATA_RUN_KEY = "bench-data"


@dataclass(frozen=True)
class Setting:
    """One row of the matrix: config overrides on top of the demo config."""

    key: str
    """Short name; also the run key, so every setting trains into its own folder."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides, e.g. ``{"compute.zero_stage": 2}``."""


# The demo default is ZeRO-3 + optimizer offload + activation checkpointing.
SETTINGS = (
    Setting("z3-offload-ckpt"),
    Setting("z3-offload", {"compute.activation_checkpointing": False}),
    Setting("z3-ckpt", {"compute.offload_optimizer": False}),
    Setting("z2-offload-ckpt", {"compute.zero_stage": 2}),
    Setting("z2-ckpt", {"compute.zero_stage": 2, "compute.offload_optimizer": False}),
)
QUICK_SETTINGS = (SETTINGS[0],)


def train_once(
    workdir: Path, data_uri: str, key: str, overrides: dict[str, Any], steps: int
) -> dict[str, Any]:
    """One ``continued_pretraining`` run; returns its row of the results table."""
    config = bench_config(workdir, {**overrides, "cpt.max_steps": steps, "cpt.log_every": steps})
    cpt, compute = config.cpt, config.compute
    tokens_per_step = (
        cpt.micro_batch_size * cpt.grad_accum_steps * compute.num_workers * config.data.seq_len
    )
    started = time.perf_counter()
    with PeakRss() as rss:
        result = run_stage("continued_pretraining", config, key, data_uri)
    wall_s = time.perf_counter() - started
    metrics = result["metrics"]
    return {
        "setting": key,
        "overrides": overrides,
        "zero_stage": compute.zero_stage,
        "offload_optimizer": compute.offload_optimizer,
        "activation_checkpointing": compute.activation_checkpointing,
        "steps": metrics["steps"],
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(metrics["tokens_per_s"], 1),
        # Mean of per-step rates, turned back into a step time (steps after the first).
        "s_per_step": round(tokens_per_step / metrics["tokens_per_s"], 4),
        "first_loss": round(metrics["first_loss"], 4),
        "final_loss": round(metrics["final_loss"], 4),
        "parameters": metrics["parameters"],
        "attention": metrics["attention"],
        "stage_s": result["seconds"],
        "wall_s": round(wall_s, 1),
        "peak_rss_tree_mb": round(rss.peak_tree_mb),
        "peak_rss_workers_mb": round(rss.peak_workers_mb),
    }


def run_matrix(
    workdir: Path, settings: tuple[Setting, ...], steps: int, warmup_first: bool
) -> dict[str, Any]:
    """prepare_data once, a warm-up run (``warmup_first``), one training run per setting.

    Returns:
        ``prepare_data_s``, ``warmup`` (a row, or None) and ``results`` (one row per setting).
    """
    started = time.perf_counter()
    data_config = bench_config(workdir, {})
    run_stage("prepare_data", data_config, DATA_RUN_KEY, None)
    prepare_data_s = round(time.perf_counter() - started, 1)
    data_uri = storage.stage_uri(data_config.storage.artifact_root, DATA_RUN_KEY, "prepare_data")
    warmup = None
    if warmup_first:
        print(f"prepare_data done; warm-up ({WARMUP_STEPS} steps of {settings[0].key})")
        # No LR warm-up in this short run: the demo's 3 warm-up steps must be below max_steps.
        warmup_overrides = {**settings[0].overrides, "cpt.warmup_steps": 0}
        warmup = train_once(workdir, data_uri, "bench-warmup", warmup_overrides, WARMUP_STEPS)
        print(f"warm-up: {warmup['wall_s']} s", flush=True)
    rows = []
    for setting in settings:
        row = train_once(workdir, data_uri, setting.key, setting.overrides, steps)
        print(f"{setting.key}: {row['tokens_per_s']} tokens/s, {row['wall_s']} s", flush=True)
        rows.append(row)
    return {"prepare_data_s": prepare_data_s, "warmup": warmup, "results": rows}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| setting | tokens/s | s/step | loss first → final | peak RSS workers (MB) | wall s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.3f} "
            f"| {r['first_loss']:.3f} → {r['final_loss']:.3f} | {r['peak_rss_workers_mb']} "
            f"| {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``argv`` ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one setting, 6 CPT steps, no separate warm-up"
    )
    parser.add_argument("--steps", type=int, default=None, help="CPT steps per setting (15)")
    # The SFT comparison: packed trainer against the HF Trainer on generated chats.
    parser.add_argument(
        "--sft-repeats", type=int, default=2, help="alternating packed/HF Trainer SFT runs (2)"
    )
    parser.add_argument(
        "--sft-steps", type=int, default=SFT_STEPS, help=f"steps per SFT run ({SFT_STEPS})"
    )
    parser.add_argument(
        "--sft-seq-len", type=int, default=SFT_SEQ_LEN, help=f"SFT block length ({SFT_SEQ_LEN})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep artifacts, MLflow and Ray logs here"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, print the table, write the JSON report; returns the exit status."""
    args = parse_args(argv)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    steps = args.steps or (6 if args.quick else 15)
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(private_ray(workdir.resolve()))
        measured = run_matrix(workdir.resolve(), settings, steps, not args.quick)
        # SFT under the demo's compute settings (the first row's), on its own data and model.
        measured["sft"] = sft_comparison(
            workdir.resolve(), settings[0].key, args.sft_steps, args.sft_repeats, args.sft_seq_len
        )
    total_s = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "train_throughput",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/train_throughput.py", *(argv or sys.argv[1:])]),
        "config": str(DEMO_CONFIG.relative_to(REPO_ROOT)),
        "steps": steps,
        "sft_steps": args.sft_steps,
        # Other work shares these cores; a high load average before the run means noisy figures.
        "environment": {**environment(), "load_average_1m_before": load_before},
        **measured,
        "total_wall_s": total_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(measured["results"]))
    print()
    print(sft_table(measured["sft"]))
    warmup = f"{measured['warmup']['wall_s']} s" if measured["warmup"] else "none"
    print(
        f"\nprepare_data {measured['prepare_data_s']} s; warm-up {warmup}; "
        f"total {total_s} s; wrote {args.out}"
    )
    # A run under the floor is a failed benchmark, not a row to read past.
    return 0 if measured["sft"]["ratio_meets_floor"] else 1


if __name__ == "__main__":
    sys.exit(main())
