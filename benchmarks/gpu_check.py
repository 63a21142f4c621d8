"""The project's trainer checked on one GPU in one call: resume, packed attention, MFU, op builds.

Runs ``pipeline.train.loop.train_worker`` (the code every Ray Train worker runs) in this
process, on a world-size-1 torch.distributed group started with the backend Ray Train gives
training workers (``cpu:gloo,cuda:nccl`` on CUDA: the loop's GPU tensors reduce through NCCL),
on inputs ``bench_inputs`` builds locally. Rows, in this order:

1. ``packed-logits``: a packed multi-row batch against every document run alone, per attention
   kernel, largest |logit difference| against a tolerance; plus how far apart a leak across
   documents puts them, so the tolerance is shown to be able to see one.
2. ``fused-adam-build``, ``cpu-adam-build``: DeepSpeed JIT-builds its optimizer ops, timed (in
   background processes started first, so the builds overlap the inputs and row 1).
3. ``nccl-resume``: 2 steps with a checkpoint after each; then the step-2 checkpoint is removed
   and a new ``train_worker`` call resumes from step 1 and trains step 2 again. Its step-2 loss,
   learning rate and exported weights must equal the uninterrupted run's.
4. The MFU matrix on the 1.10B Llama, seq 4096, packed documents, bf16: the best setting, then
   each lever moved away from it (``gpu_rows.matrix``), most telling first: LoRA and QLoRA
   over the same model first, their peak GPU memory beside the planner's. Lever rows that
   would not end inside ``--budget-s`` are skipped as ``budget``; rows 1-3 and ``best`` always
   run.

    python benchmarks/gpu_check.py            # CUDA; benchmarks/gpu_check.sh installs first
    python benchmarks/gpu_check.py --small    # CPU: gloo, tiny fp32 model, same code, < 2 min

Prints one table, writes JSON (``benchmarks/results/gpu_check.json``, ``gpu_check_small.json``
with ``--small``) after every row, and exits 1 if any row failed. A row this machine cannot run
(a kernel or package it lacks) is ``skipped`` with the reason, which is not a failure.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path.
import bench_inputs as bi
import gpu_rows as gr

from pipeline.config import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 450.0
"""Seconds from start after which no further lever row starts (8 minutes less a margin)."""
TARGET_MFU, FLOOR_MFU, TARGET_PEAK_GIB, TARGET_OFFLOAD_SAVING = 0.50, 0.45, 75.0, 0.34


# --- the run: rows in order, the budget, the report ---------------------------------------------


@dataclass
class Report:
    """The JSON written after every row (a run stopped from outside keeps what it had)."""

    out: Path
    data: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.started

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a finished row, rewrite the JSON, print its line; returns the row."""
        self.data["rows"].append(row)
        self.data["total_wall_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=2) + "\n")
        print(
            f"[{self.elapsed():5.0f} s] {row['row']}: {row['status']} {progress(row)}", flush=True
        )
        return row


def run_row(
    report: Report,
    key: str,
    lever: str,
    body: Callable[[], dict[str, Any]],
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one row and record it. An error fails the row (message and traceback kept) and the
    run goes on, so one bad lever does not cost the device time of the others."""
    import torch

    started = time.perf_counter()
    try:
        result = body()
    except Exception as err:  # any error fails this row loudly; the exit code reports it
        tail = traceback.format_exc()[-6000:]
        result = {"status": "failed", "error": f"{err!r}"[:4000], "traceback": tail}
    wall = round(time.perf_counter() - started, 1)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report.add({"row": key, "lever": lever, **(settings or {}), **result, "wall_s": wall})


def run_matrix(
    report: Report, run: gr.Run, rows: list[gr.Row], builds: dict[str, Any], budget_s: float
) -> None:
    """Train every matrix row that can run here. A lever row that would end past ``budget_s``
    (estimated by the rows before it) is skipped; ``best`` always runs."""
    best = gr.best_setting(run.facts["cuda"])
    walls: list[float] = []
    for row in rows:
        settings = gr.settings_of(best, row)
        summary = gr.settings_summary(settings, run.shape)
        reason = gr.skip_reason(settings, run.facts["cuda"], builds)
        # The best row pays the first compiles; the lever rows after it estimate each other.
        expected = max((walls[1:] or walls)[-3:], default=0.0)
        left = budget_s - report.elapsed()
        if not reason and row.key != "best" and expected > left:
            reason = f"budget: {left:.0f} s of --budget-s left, a row takes about {expected:.0f} s"
        if reason:
            skipped = {"row": row.key, "lever": row.lever, **summary}
            report.add(skipped | {"status": "skipped", "reason": reason})
            continue
        done = run_row(
            report,
            row.key,
            row.lever,
            functools.partial(gr.matrix_row, run, row, gr.bench_config(run, run.shape, settings)),
            summary,
        )
        walls.append(done["wall_s"])


def build_inputs(
    workdir: Path, shape: bi.Shape, resume: bi.Shape, cuda: bool
) -> tuple[dict[str, str], dict[str, Any]]:
    """Tokenizer, the two models and the data; returns their folders and their sizes."""
    inputs = {name: str(workdir / name) for name in ("tokenizer", "model", "resume_model", "data")}
    tok = bi.write_tokenizer(shape.vocab, Path(inputs["tokenizer"]))
    n_params = bi.write_model(shape, tok, Path(inputs["model"]), cuda)
    if resume.hidden == shape.hidden and resume.layers == shape.layers:
        inputs["resume_model"], n_resume = inputs["model"], n_params
    else:
        n_resume = bi.write_model(resume, tok, Path(inputs["resume_model"]), cuda)
    n_blocks = max(int(m) for m in gr.MICRO) // shape.micro_divisor * shape.steps
    docs = bi.synthetic_documents(shape, n_blocks, seed=0)
    blocks = bi.write_data(docs, Path(inputs["data"]), shape, tok.eos_token_id, tok.pad_token_id)
    sizes = {
        "parameters": n_params,
        "resume_parameters": n_resume,
        "blocks": len(blocks),
        "segments_per_block": round(bi.segments_per_block(blocks), 2),
    }
    return inputs, sizes


def environment(facts: dict[str, Any], backend: str) -> dict[str, Any]:
    """Device, process group and the versions of everything on the training path."""
    import platform

    import torch

    versions: dict[str, str | None] = {}
    for dist in (
        "torch",
        "triton",
        "deepspeed",
        "transformers",
        "huggingface_hub",
        "tokenizers",
        "safetensors",
        "pydantic",
        "numpy",
        "liger_kernel",
        "flash_attn",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "device": facts["name"],
        "capability": facts["capability"],
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cuda": torch.version.cuda,
        "backend": backend,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def scratch_dir(cuda: bool) -> str | None:
    """Where the inputs and each row's checkpoint go: RAM (/dev/shm) on a GPU machine with room
    for the 1.1B's inputs, one row's 15 GB checkpoint and its 2 GB export, so writing them costs
    seconds; else the system temp dir."""
    shm = Path("/dev/shm")
    if cuda and shm.is_dir() and shutil.disk_usage(shm).free > 24 * 2**30:
        return str(shm)
    return None


def run_checks(
    args: argparse.Namespace, report: Report, facts: dict[str, Any], workdir: Path
) -> None:
    """Every row, in order: the builds start first, in the background."""
    cuda = facts["cuda"]
    shape = bi.SMALL_SHAPE if args.small else bi.GPU_SHAPE
    shape = replace(shape, steps=args.steps or shape.steps)
    resume = replace(bi.SMALL_SHAPE if args.small else bi.GPU_RESUME_SHAPE, steps=2)
    started = {
        "fused-adam-build": gr.start_build("FusedAdamBuilder", cuda),
        "cpu-adam-build": gr.start_build("CPUAdamBuilder", cuda),
    }
    inputs, sizes = build_inputs(workdir, shape, resume, cuda)
    report.data |= sizes | {"inputs_s": round(report.elapsed(), 1)}
    run = gr.Run(workdir, inputs, shape, facts)
    run_row(report, "packed-logits", "check", lambda: gr.logits_row(inputs["model"], shape, cuda))
    builds = {
        key: run_row(report, key, "check", functools.partial(gr.finish_build, proc))
        for key, proc in started.items()
    }
    run_row(report, "nccl-resume", "check", lambda: gr.resume_row(run, resume))
    rows = gr.matrix(gr.best_setting(cuda))
    if args.rows:
        rows = [r for r in rows if r.key in args.rows.split(",")]
    run_matrix(report, run, rows, builds, args.budget_s)


def main(argv: list[str] | None = None) -> int:
    """Run every row and report; the exit code is 1 if a row failed.

    Raises:
        SystemExit: no CUDA device without ``--small``, or ``--rows`` names unknown rows.
    """
    args = parse_args(argv)
    facts = bi.device_facts()
    if not facts["cuda"] and not args.small:
        raise SystemExit("no CUDA device: run with --small for the CPU check of this code path")
    known = [r.key for r in gr.matrix(gr.best_setting(facts["cuda"]))]
    unknown = sorted(set(args.rows.split(",")) - set(known)) if args.rows else []
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; the matrix here has {known}")
    bi.set_cuda_arch(facts)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    backend = args.backend or bi.project_backend(facts["cuda"])
    out = args.out or RESULTS / ("gpu_check_small.json" if args.small else "gpu_check.json")
    command = ["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    report = Report(
        out,
        {
            "benchmark": "gpu_check",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(command),
            "environment": environment(facts, backend),
            "budget_s": args.budget_s,
            "rows": [],
        },
    )
    import torch.distributed as dist

    bi.init_process_group(backend, facts["cuda"])
    try:
        with tempfile.TemporaryDirectory(dir=scratch_dir(facts["cuda"])) as scratch:
            workdir = (args.workdir or Path(scratch)).resolve()
            run_checks(args, report, facts, workdir)
    finally:
        dist.destroy_process_group()
    return finish(report)


def finish(report: Report) -> int:
    """Print the table, the targets and every failure; 1 if a row failed."""
    rows = report.data["rows"]
    report.data["targets"] = targets(rows)
    report.add({"row": "total", "lever": "", "status": "ok", "wall_s": round(report.elapsed(), 1)})
    print("\n" + markdown_table(rows) + "\n")
    for line in report.data["targets"]:
        print(line)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"\nFAILED {r['row']}: {r['error']}\n{r.get('traceback', '')}", file=sys.stderr)
    print(
        f"\n{len(failed)} failed, {sum(r['status'] == 'skipped' for r in rows)} skipped; wrote {report.out}"
    )
    return 1 if failed else 0


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets against the rows that ran: best MFU and peak, offload's saving."""
    by_key = {r["row"]: r for r in rows if r["status"] == "ok"}
    lines = []
    best = by_key.get("best")
    if best is None or best.get("mfu") is None:
        lines.append(
            f"target best MFU >= {TARGET_MFU:.0%} (floor {FLOOR_MFU:.0%}): n/a (no MFU here)"
        )
    else:
        mfu, peak = best["mfu"], best["peak_memory_gib"]
        flops = mfu * best["pool_peak_tflops"] * 1e12 / best["tokens_per_s"]
        lines.append(
            f"MFU is the loop's: tokens/s x its {flops / 1e9:.2f} GFLOP per token / the pool's "
            f"{best['pool_peak_tflops']:g} TFLOP/s bf16 peak (pipeline/planning/hardware.py POOLS)"
        )
        verdict = "met" if mfu >= TARGET_MFU else "floor met" if mfu >= FLOOR_MFU else "MISSED"
        lines.append(
            f"target best MFU >= {TARGET_MFU:.0%} (floor {FLOOR_MFU:.0%}): {mfu:.1%}, {verdict}"
        )
        fits = "met" if peak <= TARGET_PEAK_GIB else "MISSED"
        lines.append(f"target best peak <= {TARGET_PEAK_GIB:.0f} GiB: {peak:.1f} GiB, {fits}")
    on_gpu, offload = by_key.get("z3-ckpt"), by_key.get("z3-ckpt-offload")
    if on_gpu is None or offload is None or on_gpu["allocated_before_gib"] is None:
        # Without CUDA the peak is the process's RSS, which never goes down: not comparable.
        lines.append(f"target offload saves >= {TARGET_OFFLOAD_SAVING:.0%} GPU memory: n/a")
    else:
        before, after = on_gpu["peak_memory_gib"], offload["peak_memory_gib"]
        saving = 1 - after / before
        verdict = "met" if saving >= TARGET_OFFLOAD_SAVING else "MISSED"
        lines.append(
            f"target offload saves >= {TARGET_OFFLOAD_SAVING:.0%} GPU memory: {saving:.0%} "
            f"({before:.1f} -> {after:.1f} GiB at the same batch), {verdict}"
        )
    lines += adapter_memory(by_key)
    return lines


def adapter_memory(by_key: dict[str, dict[str, Any]]) -> list[str]:
    """The adapter rows' measured peak GPU memory against the planner's, beside best's (full
    weights at the same setting)."""
    lines = []
    for key in ("best", "method-lora", "method-qlora"):
        r = by_key.get(key)
        if r is None or r.get("allocated_before_gib") is None:
            lines.append(f"{key}: measured vs planned peak GPU memory: n/a (not run on CUDA)")
            continue
        measured, planned = r["peak_memory_gib"], r["predicted_peak_gib"]
        lines.append(
            f"{key} ({r['method']}, {r['trainable_parameters']:,} trained): peak "
            f"{measured:.1f} GiB measured, {planned:.1f} GiB planned "
            f"({measured / planned - 1:+.0%})"
        )
    return lines


def progress(r: dict[str, Any]) -> str:
    """The line printed as a row ends."""
    if r["status"] != "ok" or "tokens_per_s" not in r:
        return detail(r)
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return (
        f"{r['tokens_per_s']:.0f} tokens/s, MFU {mfu}, peak {r['peak_memory_gib']:.1f} GiB, "
        f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}, {r['wall_s']:.0f} s"
    )


def detail(r: dict[str, Any]) -> str:
    """One cell: what a check row found, why a row was skipped, how it failed."""
    if r["status"] == "skipped":
        return r["reason"]
    if r["status"] == "failed":
        return r["error"].splitlines()[0][:160]
    if r["row"] == "packed-logits":
        cells = [
            f"{k} " + (f"{v['max_abs_diff']:.1e}" if "max_abs_diff" in v else "skipped")
            for k, v in r["kernels"].items()
        ]
        return f"{', '.join(cells)} (tolerance {r['tolerance']:g}; a leak: {r['leak_max_abs_diff']:.1e})"
    if r["row"] == "nccl-resume":
        a, b = r["uninterrupted_losses"][1], r["resumed_losses"][1]
        return (
            f"resumed from step {r['resumed_from_step']}; step-2 loss {a:.5f} vs {b:.5f} "
            f"(tolerance {r['loss_tolerance']:g}); lr equal {r['lr_equal']}; weights "
            f"{r['weights_moved']['apart_share']:.1%} of the updates apart"
        )
    if "build_s" in r:
        return f"built or loaded in {r['build_s']} s"
    return ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Every row in one table: its settings, the loop's figures, and what a check found."""
    head = (
        "| row | status | attention | loss | ckpt | compile | ZeRO | offload | micro | tokens/s "
        "| MFU | peak GiB (planned) | loss first → final | s | detail |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if r["row"] == "total":
            continue
        ok = r["status"] == "ok" and "tokens_per_s" in r
        settings = [
            str(r.get(k, ""))
            for k in (
                "attention",
                "cross_entropy",
                "checkpointing",
                "compile_layers",
                "zero_stage",
                "offload_optimizer",
                "micro",
            )
        ]
        figures = ["", "", "", ""]
        if ok:
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            figures = [
                f"{r['tokens_per_s']:.0f}",
                mfu,
                f"{r['peak_memory_gib']:.1f}"
                + (f" ({r['predicted_peak_gib']:.1f})" if r.get("predicted_peak_gib") else ""),
                f"{r['first_loss']:.4f} → {r['final_loss']:.4f}",
            ]
        cells = [
            r["row"],
            r["status"],
            *settings,
            *figures,
            f"{r['wall_s']:.0f}" if "wall_s" in r else "",
            detail(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU: gloo, tiny fp32 model, 3 steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per gr.matrix row")
    parser.add_argument(
        "--rows", default=None, help="comma-separated gr.matrix rows (default: all)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"no lever row starts that would end past this many seconds ({DEFAULT_BUDGET_S:g})",
    )
    parser.add_argument(
        "--backend", default=None, help="process group backend (default: the project's)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the inputs here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
