"""Full fine-tuning against LoRA and QLoRA on the same SFT data, through the real stages on CPU.

Runs ``prepare_data`` and a short ``continued_pretraining`` (the model every row starts from;
it also absorbs DeepSpeed's one-time JIT build and cold imports) on ``configs/demo.yaml``
against a private, token-authenticated Ray head, then ``instruction_finetuning`` once per method
(``sft.method`` full, lora, qlora) from that model, on the same prepared chats, seed and steps,
with the demo's compute settings (2 Ray Train workers, DeepSpeed ZeRO-3, CPU Adam, fp32).

For each method it reports the peak resident memory per Ray Train worker, the target tokens per
second (the trainer's own metric: tokens whose loss counts, per second of step), the loss after
the fixed number of steps and the parameters trained. One table from one run:

    .venv/bin/python benchmarks/adapters.py                 # 12 SFT steps per method
    .venv/bin/python benchmarks/adapters.py --steps 4       # quicker
    .venv/bin/python benchmarks/adapters.py --set model.hidden_size=512 ...  # a bigger model

Writes JSON (default ``benchmarks/results/adapters.json``). A method whose run fails, or whose
loss is not finite, fails the benchmark (exit status 1) after the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path.
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
from pipeline.cli import parse_overrides
from pipeline.config import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "adapters.json"
METHODS = ("full", "lora", "qlora")
DATA_RUN_KEY = "adapters-data"


def sft_once(
    workdir: Path,
    cpt_uri: str,
    method: str,
    steps: int,
    lr: float,
    rank: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One ``instruction_finetuning`` run of ``method`` from the CPT stage at ``cpt_uri``."""
    overrides: dict[str, Any] = {
        **extra,
        "sft.method": method,
        "sft.max_steps": steps,
        "sft.warmup_steps": 0,
        "sft.log_every": steps,
        "sft.checkpoint_every": steps,
        "sft.lr": lr,
        "sft.adapter.rank": rank,
    }
    config = bench_config(workdir, overrides)
    started = time.perf_counter()
    with PeakRss() as rss:
        result = run_stage("instruction_finetuning", config, f"adapters-{method}", cpt_uri)
    wall_s = time.perf_counter() - started
    metrics = result["metrics"]
    sft, workers = config.sft, config.compute.num_workers
    tokens_per_step = sft.micro_batch_size * sft.grad_accum_steps * workers * config.data.seq_len
    return {
        "method": method,
        "lr": lr,
        "rank": rank if method != "full" else None,
        "steps": metrics["steps"],
        "first_loss": round(metrics["first_loss"], 4),
        "final_loss": round(metrics["final_loss"], 4),
        "target_tokens_per_s": round(metrics["target_tokens_per_s"], 1),
        "tokens_per_s": round(metrics["tokens_per_s"], 1),
        # Mean of per-step rates turned back into a step time (the steps after the first).
        "s_per_step": round(tokens_per_step / metrics["tokens_per_s"], 4),
        "trainable_parameters": metrics["trainable_parameters"],
        "parameters": metrics["parameters"],
        "peak_rss_per_worker_mb": round(rss.peak_workers_mb / workers),
        "wall_s": round(wall_s, 1),
    }


def run_methods(
    workdir: Path,
    steps: int,
    full_lr: float,
    adapter_lr: float,
    rank: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """prepare_data, a short CPT to start from, then one SFT run per method (``extra``
    overrides apply to all); a method that fails gets an ``error`` row, the others still run."""
    data_config = bench_config(workdir, extra)
    run_stage("prepare_data", data_config, DATA_RUN_KEY, None)
    data_uri = storage.stage_uri(data_config.storage.artifact_root, DATA_RUN_KEY, "prepare_data")
    cpt_config = bench_config(
        workdir, {**extra, "cpt.max_steps": WARMUP_STEPS, "cpt.warmup_steps": 0}
    )
    started = time.perf_counter()
    run_stage("continued_pretraining", cpt_config, DATA_RUN_KEY, data_uri)
    cpt_s = round(time.perf_counter() - started, 1)
    cpt_uri = storage.stage_uri(
        data_config.storage.artifact_root, DATA_RUN_KEY, "continued_pretraining"
    )
    print(f"prepare_data and a {WARMUP_STEPS}-step CPT done ({cpt_s} s)", flush=True)
    rows = []
    for method in METHODS:
        lr = full_lr if method == "full" else adapter_lr
        try:
            row = sft_once(workdir, cpt_uri, method, steps, lr, rank, extra)
        except Exception as err:  # reported in the table and the exit status, not swallowed
            traceback.print_exc()
            row = {"method": method, "lr": lr, "error": f"{type(err).__name__}: {err}"}
        print(f"{method}: {row.get('final_loss', row.get('error'))}", flush=True)
        rows.append(row)
    return {"cpt_warmup_s": cpt_s, "results": rows}


def failed(row: dict[str, Any]) -> bool:
    return "error" in row or not math.isfinite(row["final_loss"])


def markdown_table(rows: list[dict[str, Any]], steps: int) -> str:
    lines = [
        f"| method | lr | trained params | peak RSS / worker | target tokens/s | s/step "
        f"| loss step 1 -> {steps} |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['lr']:g} | failed: {r['error'][:80]} |||||")
            continue
        share = 100 * r["trainable_parameters"] / r["parameters"]
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_parameters']:,} ({share:.1f}%) "
            f"| {r['peak_rss_per_worker_mb']:,} MB | {r['target_tokens_per_s']:,.0f} "
            f"| {r['s_per_step']:.3f} | {r['first_loss']:.4f} -> {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="SFT steps per method")
    parser.add_argument("--full-lr", type=float, default=2e-3, help="lr of full fine-tuning")
    parser.add_argument(
        "--adapter-lr", type=float, default=1e-2, help="lr of LoRA and QLoRA (adapters want more)"
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override for every run, e.g. model.hidden_size=512",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    parser.add_argument("--workdir", type=Path, default=None, help="keep artifacts here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(private_ray(workdir.resolve()))
        extra = parse_overrides(args.set)
        measured = run_methods(
            workdir.resolve(), args.steps, args.full_lr, args.adapter_lr, args.rank, extra
        )
    total_s = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "adapters",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/adapters.py", *(argv or sys.argv[1:])]),
        "config": str(DEMO_CONFIG.relative_to(REPO_ROOT)),
        "steps": args.steps,
        "overrides": args.set,
        "environment": environment(),
        **measured,
        "total_wall_s": total_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(measured["results"], args.steps))
    print(f"\ntotal {total_s} s; wrote {args.out}")
    return 1 if any(failed(r) for r in measured["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
