"""What each row of the GPU check runs: the MFU matrix's levers and one training run, the
packed-logits check, the checkpoint resume and DeepSpeed's op builds.

``gpu_check.py`` decides the order, the budget and the report; everything here returns a row's
figures as a dict or raises, and the caller records the error as that row's failure.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path.
import bench_inputs as bi

from pipeline import storage
from pipeline.config import PipelineConfig, load_config

LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.5}
"""Largest |packed - alone| logit difference accepted. bf16: the 1.1B's 16 layers round the
two ways apart by 0.10 on eager (CPU, 1024 tokens), where a leak moves logits by 6.9."""
LEAK_MARGIN = 4.0
"""A leak across documents must move the logits this many tolerances at least, or the logits
check could not see one."""
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-3}
"""Largest |resumed - uninterrupted| step-2 loss accepted."""
WEIGHTS_TOLERANCE = 0.02
"""Resumed and uninterrupted weights after step 2 may differ by this share of the updates."""
EQUALITY_KERNELS = ("flex_attention", "flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class Row:
    """One row of the MFU matrix: the best setting with ``overrides`` applied."""

    key: str
    lever: str
    overrides: dict[str, Any] = field(default_factory=dict)


# Each lever's values, as config overrides; ``matrix`` keeps those that differ from the best.
ATTENTION = {
    "flash": {"compute.attention": "flash_attention_2"},
    "flex": {"compute.attention": "flex_attention"},
    "sdpa": {"compute.attention": "sdpa"},
}
CROSS_ENTROPY = {v: {"compute.cross_entropy": v} for v in ("fused", "chunked", "full")}
CHECKPOINTING = {
    "off": {"compute.activation_checkpointing": False, "compute.checkpoint_every_n_layers": 1},
    "every": {"compute.activation_checkpointing": True, "compute.checkpoint_every_n_layers": 1},
    "every2": {"compute.activation_checkpointing": True, "compute.checkpoint_every_n_layers": 2},
}
COMPILE = {"on": {"compute.compile_layers": True}, "off": {"compute.compile_layers": False}}
# Adapters over the frozen 1.10B: LoRA over its bf16 weights, QLoRA over NF4 ones (peft,
# bitsandbytes); measured peak memory against the planner's prediction.
METHOD = {m: {"cpt.method": m} for m in ("lora", "qlora")}
ZERO = {str(s): {"compute.zero_stage": s} for s in (0, 1, 2, 3)}
MICRO = {str(m): {"cpt.micro_batch_size": m} for m in (4, 8, 16)}
LEVERS: dict[str, dict[str, dict[str, Any]]] = {
    "method": METHOD,
    "attn": ATTENTION,
    "ce": CROSS_ENTROPY,
    "ckpt": CHECKPOINTING,
    "compile": COMPILE,
    "zero": ZERO,
    "micro": MICRO,
}
# ZeRO-3 with and without the optimizer on the CPU at the same batch; checkpointing on, so the
# optimizer state is what is left to save (target: TARGET_OFFLOAD_SAVING less peak memory).
Z3_CKPT = {"compute.zero_stage": 3, **CHECKPOINTING["every"], "compute.cross_entropy": "chunked"}
OFFLOAD_PAIR = (
    Row("z3-ckpt", "offload", Z3_CKPT),
    Row("z3-ckpt-offload", "offload", Z3_CKPT | {"compute.offload_optimizer": True}),
)
RESUME = {
    "compute.zero_stage": 3,
    **CHECKPOINTING["every"],
    "compute.cross_entropy": "chunked",
    # The resume row checks collectives and the checkpoint round trip: no per-shape compiles.
    "compute.attention": "sdpa",
    "compute.compile_layers": False,
    "cpt.micro_batch_size": 2,
    "cpt.checkpoint_every": 1,
    "cpt.keep_last": 2,
}


def best_setting(cuda: bool) -> dict[str, Any]:
    """The fastest setting expected here: each lever at the best value this machine runs."""
    from pipeline.train.attention import flash_attention_available, flex_attention_available

    attention = "flash" if flash_attention_available() else "flex"
    if not flex_attention_available():
        attention = "sdpa"
    fused = cuda and importlib.util.find_spec("liger_kernel") is not None
    return {
        **ATTENTION[attention],
        **CROSS_ENTROPY["fused" if fused else "chunked"],
        **CHECKPOINTING["off"],
        **COMPILE["on" if cuda else "off"],
        **ZERO["1"],
        **MICRO["8"],
        "compute.offload_optimizer": False,
    }


def matrix(best: dict[str, Any]) -> list[Row]:
    """``best``, the offload pair, then one row per lever value that differs from ``best``."""
    rows = [Row("best", "best"), *OFFLOAD_PAIR]
    for lever, values in LEVERS.items():
        rows += [
            Row(f"{lever}-{label}", lever, overrides)
            for label, overrides in values.items()
            if best | overrides != best
        ]
    return rows


def settings_of(best: dict[str, Any], row: Row) -> dict[str, Any]:
    """The row's overrides on top of ``best``; ZeRO-3 takes the chunked loss (the fused one
    reads the whole LM head weight, which ZeRO-3 partitions)."""
    settings = best | row.overrides
    if settings["compute.zero_stage"] == 3 and settings["compute.cross_entropy"] == "fused":
        settings["compute.cross_entropy"] = "chunked"
    return settings


def kernel_skip_reason(attention: str) -> str:
    """Why this attention kernel cannot run here ('' when it can)."""
    from pipeline.train.attention import flash_attention_available, flex_attention_available

    if attention == "flash_attention_2" and not flash_attention_available():
        return "flash_attention_2 needs CUDA and flash-attn, not installed here"
    if attention == "flex_attention" and not flex_attention_available():
        return "flex_attention needs CUDA (on CPU it needs minutes of torch.compile)"
    return ""


def skip_reason(settings: dict[str, Any], cuda: bool, builds: dict[str, dict[str, Any]]) -> str:
    """Why these settings cannot run here ('' when they can); ``builds`` are the op-build rows."""
    reason = kernel_skip_reason(settings["compute.attention"])
    if reason:
        return reason
    if settings["compute.cross_entropy"] == "fused":
        if not cuda:
            return "the fused loss is liger-kernel's CUDA kernel"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    if settings["compute.compile_layers"] and not cuda:
        return "torch.compile is measured on CUDA only (the CPU check stays under 2 minutes)"
    method = settings.get("cpt.method", "full")
    needs = {"lora": ["peft"], "qlora": ["peft", "bitsandbytes"]}.get(method, [])
    missing = [package for package in needs if importlib.util.find_spec(package) is None]
    if missing:
        return f"{method} needs {' and '.join(missing)}, not installed here"
    op = "cpu-adam-build" if settings["compute.offload_optimizer"] else "fused-adam-build"
    if (cuda or op == "cpu-adam-build") and builds.get(op, {}).get("status") == "failed":
        return f"needs the optimizer op of row {op}, which failed"
    return ""


# --- one training run ---------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one ``train_worker`` call needs besides its config."""

    workdir: Path
    inputs: dict[str, str]
    shape: bi.Shape
    facts: dict[str, Any]


def bench_config(run: Run, shape: bi.Shape, settings: dict[str, Any]) -> PipelineConfig:
    """The demo config resized to ``shape``, set to ``settings``, for one worker."""
    cuda, name = run.facts["cuda"], run.facts["name"]
    overrides: dict[str, Any] = {
        **bi.shape_overrides(shape),
        "cpt.max_steps": shape.steps,
        "cpt.grad_accum_steps": 1,
        "cpt.warmup_steps": 0,
        "cpt.log_every": shape.steps,
        # The loop always checkpoints after the last step; no earlier ones inside the timing.
        "cpt.checkpoint_every": shape.steps,
        "cpt.keep_last": 1,
        "compute.pool": "cpu" if not cuda else "a100" if "A100" in name else "h100",
        "compute.num_workers": 1,
        # The CPU optimizer of the offload rows uses these threads; on CPU, stay on one core.
        "compute.cpus_per_worker": os.cpu_count() if cuda else 1,
        "compute.precision": shape.precision,
        "compute.local_scratch": str(run.workdir / "scratch"),
        "storage.artifact_root": str(run.workdir / "artifacts"),
    }
    overrides |= settings
    overrides["cpt.micro_batch_size"] = settings_summary(settings, shape)["micro"]
    return load_config(bi.DEMO_CONFIG, overrides)


def train(run: Run, config: PipelineConfig, folder: Path, model: str = "model") -> dict[str, Any]:
    """One ``train_worker`` call writing under ``folder``; returns its train_metrics.json plus
    wall time, the GPU memory allocated before it and its peak.

    Raises:
        RuntimeError: the loop aborted the run (the message is its guard's).
        FileNotFoundError: the loop wrote no metrics.
    """
    import torch

    from pipeline.train.loop import ABORT_FILE, TRAIN_METRICS_FILE, train_worker

    output_uri = str(folder / "model")
    spec: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "section": "cpt",
        "model_uri": run.inputs[model],
        "tokenizer_uri": run.inputs["tokenizer"],
        "data_uri": run.inputs["data"],
        "split": bi.SPLIT,
        "output_uri": output_uri,
        "checkpoint_uri": str(folder / "checkpoints"),
        "mlflow_run_id": "",  # no MLflow: the GPU machine has no tracking server
    }
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**30 if cuda else None
    started = time.perf_counter()
    train_worker(spec)
    wall_s = time.perf_counter() - started
    abort = storage.join(output_uri, ABORT_FILE)
    if storage.exists(abort):
        raise RuntimeError(f"the loop aborted the run: {storage.read_json(abort)['error']}")
    metrics: dict[str, Any] = storage.read_json(storage.join(output_uri, TRAIN_METRICS_FILE))
    metrics["wall_s"] = round(wall_s, 1)
    metrics["allocated_before_gib"] = before
    metrics["measured_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return metrics


def optimizer_name(config: PipelineConfig) -> str:
    """The optimizer ``pipeline.train.zero.deepspeed_config`` makes DeepSpeed build."""
    if config.compute.offload_optimizer:
        return "DeepSpeedCPUAdam"
    return "torch AdamW" if config.compute.pool == "cpu" else "FusedAdam"


def matrix_row(run: Run, row: Row, config: PipelineConfig) -> dict[str, Any]:
    """Train one matrix row; its figures as the loop reports them."""
    from pipeline.planning.hardware import POOLS
    from pipeline.planning.search import predicted_step

    folder = run.workdir / "runs" / row.key
    try:
        metrics = train(run, config, folder)
    finally:
        # Weights and checkpoints of every row would fill the disk; the metrics are kept.
        shutil.rmtree(folder, ignore_errors=True)
    if metrics["first_loss"] is None or not metrics["tokens_per_s"] > 0:
        raise RuntimeError(f"no step was applied: losses {metrics.get('loss_history')}")
    peak = metrics["measured_peak_gib"]
    predicted = predicted_step(config, "cpt")
    return {
        "status": "ok",
        "trainable_parameters": metrics.get("trainable_parameters"),
        # The planner's figure for this setting (0 on CPU, where it plans host memory only).
        "predicted_peak_gib": round(predicted["predicted_gpu_memory_gib"], 2),
        "optimizer": optimizer_name(config),
        "attention_ran": metrics.get("attention"),
        "tokens_per_s": round(float(metrics["tokens_per_s"]), 1),
        "mfu": metrics.get("mfu"),
        "pool_peak_tflops": POOLS[config.compute.pool].peak_tflops[config.compute.precision],
        "peak_memory_gib": round(peak if peak is not None else metrics["peak_memory_gib"], 2),
        "allocated_before_gib": metrics["allocated_before_gib"],
        "first_loss": round(metrics["first_loss"], 6),
        "final_loss": round(metrics["final_loss"], 6),
        "steps": metrics["steps"],
        "step_time_s": metrics["step_time_s"],
        "train_wall_s": metrics["wall_s"],
    }


def settings_summary(settings: dict[str, Any], shape: bi.Shape) -> dict[str, Any]:
    """The table's columns of one row's settings (the micro batch as it trains)."""
    checkpointing = settings["compute.activation_checkpointing"]
    return {
        "method": settings.get("cpt.method", "full"),
        "attention": settings["compute.attention"],
        "cross_entropy": settings["compute.cross_entropy"],
        "checkpointing": f"1/{settings['compute.checkpoint_every_n_layers']}"
        if checkpointing
        else "off",
        "compile_layers": settings["compute.compile_layers"],
        "zero_stage": settings["compute.zero_stage"],
        "offload_optimizer": settings["compute.offload_optimizer"],
        "micro": max(1, settings["cpt.micro_batch_size"] // shape.micro_divisor),
    }


# --- the checks that always run -------------------------------------------------------------------


def resume_row(run: Run, shape: bi.Shape) -> dict[str, Any]:
    """Uninterrupted 2 steps, then a resume from its step-1 checkpoint; both must agree."""
    from pipeline.train.checkpoint import tag_for

    settings = best_setting(run.facts["cuda"]) | RESUME
    config = bench_config(run, shape, settings)
    folder = run.workdir / "runs" / "nccl-resume"
    try:
        first = train(run, config, folder / "uninterrupted", model="resume_model")
        exported = folder / "uninterrupted-model"
        (folder / "uninterrupted" / "model").rename(exported)
        # The resumed attempt finds the step-1 checkpoint newest: as if the worker had died
        # after writing it. Same config and inputs, so the same training fingerprint.
        series = Path(first["checkpoint_uri"])
        shutil.rmtree(series / tag_for(2), ignore_errors=True)
        resumed = train(run, config, folder / "uninterrupted", model="resume_model")
        moved = weights_moved(
            Path(run.inputs["resume_model"]), exported, folder / "uninterrupted" / "model"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    losses, again = first["loss_history"], resumed["loss_history"]
    result = {
        **settings_summary(settings, shape),
        "resumed_from_step": resumed["resumed_from_step"],
        "uninterrupted_losses": losses,
        "resumed_losses": again,
        "step2_loss_diff": None if None in (losses[1], again[1]) else abs(again[1] - losses[1]),
        "loss_tolerance": LOSS_TOLERANCE[shape.precision],
        "lr_equal": first["lr_history"] == resumed["lr_history"],
        "weights_moved": moved,
        "checkpoint_steps": [first["checkpoint_steps"], resumed["checkpoint_steps"]],
    }
    problems = resume_problems(result)
    if problems:
        raise RuntimeError("; ".join(problems) + f" ({json.dumps(result)})")
    return {"status": "ok", **result}


def resume_problems(r: dict[str, Any]) -> list[str]:
    """What a resume that continues the uninterrupted run exactly would not show."""
    problems = []
    if r["resumed_from_step"] != 1:
        problems.append(f"resumed from step {r['resumed_from_step']}, not 1")
    if r["step2_loss_diff"] is None or r["step2_loss_diff"] > r["loss_tolerance"]:
        problems.append(f"step-2 losses differ by {r['step2_loss_diff']}")
    if not r["lr_equal"]:
        problems.append("the learning rates differ (scheduler state not restored)")
    if r["weights_moved"]["apart_share"] > WEIGHTS_TOLERANCE:
        problems.append(
            f"weights after step 2 differ by {r['weights_moved']['apart_share']:.1%} of the "
            "updates (optimizer state not restored?)"
        )
    return problems


def weights_moved(initial: Path, uninterrupted: Path, resumed: Path) -> dict[str, float]:
    """Mean |uninterrupted - resumed| weight over the mean |uninterrupted - initial|: 0 when the
    resume restored weights, optimizer moments and schedule; about 1 when it restarted."""
    from safetensors.torch import load_file

    a, b, w0 = (load_file(str(p / "model.safetensors")) for p in (uninterrupted, resumed, initial))
    apart = sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a)
    update = sum(float((a[k].float() - w0[k].float()).abs().sum()) for k in a)
    return {"apart_share": apart / update if update else float("inf"), "update_sum": update}


def logits_row(model_dir: str, shape: bi.Shape, cuda: bool) -> dict[str, Any]:
    """Largest |packed - alone| logit difference per kernel, and what a leak would give."""
    import torch

    from pipeline.train.attention import select_attention
    from pipeline.train.model import load_causal_lm

    dtype = torch.bfloat16 if shape.precision == "bf16" else torch.float32
    device = "cuda" if cuda else "cpu"
    model = load_causal_lm(model_dir, "sdpa", dtype).eval().to(device)
    ids_np, pos_np = bi.equality_rows(shape, rows=2, seed=1)
    ids = torch.as_tensor(ids_np, device=device)
    pos = torch.as_tensor(pos_np, device=device)
    tolerance = LOGIT_TOLERANCE[shape.precision]
    kernels: dict[str, Any] = {}
    with torch.no_grad():
        # The control: plain causal attention over the whole row lets documents see each other.
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=device).tril()
        leak = packed_vs_alone(model, "sdpa", ids, pos, {"attention_mask": causal[None, None]})
        for kernel in EQUALITY_KERNELS:
            reason = kernel_skip_reason(kernel)
            if reason:
                kernels[kernel] = {"skipped": reason}
                continue
            kernels[kernel] = {
                "max_abs_diff": packed_vs_alone(model, select_attention(kernel), ids, pos)
            }
    del model
    bad = [k for k, r in kernels.items() if r.get("max_abs_diff", 0.0) > tolerance]
    result = {"kernels": kernels, "tolerance": tolerance, "leak_max_abs_diff": leak}
    if bad:
        raise RuntimeError(
            f"packed logits differ from alone beyond {tolerance} on {bad}: {kernels}"
        )
    if leak < LEAK_MARGIN * tolerance:
        raise RuntimeError(
            f"a leak across documents moves the logits by {leak:.3g} only, under {LEAK_MARGIN}x "
            f"the tolerance {tolerance}: this check cannot see one; lower LOGIT_TOLERANCE"
        )
    return {"status": "ok", **result}


def packed_vs_alone(
    model: Any, impl: str, ids: Any, pos: Any, inputs: dict[str, Any] | None = None
) -> float:
    """Largest |logit| difference between the packed rows (``packed_model_inputs`` for
    ``impl``, or ``inputs``) and each document run alone on ``impl``."""
    from pipeline.train.attention import packed_model_inputs

    model.set_attn_implementation(impl)
    batch, seq = ids.shape
    kwargs = {"input_ids": ids, "position_ids": pos, **inputs} if inputs else None
    out = model(**(kwargs or packed_model_inputs(ids, pos, impl))).logits
    packed = out.reshape(batch, seq, -1).float()
    worst = 0.0
    for row in range(batch):
        starts = [*(pos[row] == 0).nonzero().flatten().tolist(), seq]
        for start, end in itertools.pairwise(starts):
            alone = model(
                input_ids=ids[row : row + 1, start:end], position_ids=pos[row : row + 1, start:end]
            )
            worst = max(
                worst, float((packed[row, start:end] - alone.logits[0].float()).abs().max())
            )
    return worst


BUILD_SCRIPT = """
import json, time
from deepspeed.ops.op_builder import {builder}
started = time.perf_counter()
{builder}().load()
print(json.dumps({{"build_s": round(time.perf_counter() - started, 1)}}))
"""


def start_build(builder: str, cuda: bool) -> subprocess.Popen[str] | str:
    """Start JIT-building a DeepSpeed op in a process of its own; the reason when it cannot."""
    if builder == "FusedAdamBuilder" and not cuda:
        return "FusedAdam is a CUDA op; CPU rows run torch AdamW"
    env = os.environ | ({} if cuda else {"DS_ACCELERATOR": "cpu"})
    # The ninja the loop builds with (it puts this environment's first on PATH): two ninja
    # versions hash build commands differently and would rebuild the op for each other.
    env_bin = Path(sys.executable).parent
    if (env_bin / "ninja").exists():
        env["PATH"] = f"{env_bin}{os.pathsep}{env['PATH']}"
    script = BUILD_SCRIPT.format(builder=builder)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_build(proc: subprocess.Popen[str] | str, timeout_s: float = 600) -> dict[str, Any]:
    """Wait for ``start_build``'s process; its build seconds, or the error."""
    if isinstance(proc, str):
        return {"status": "skipped", "reason": proc}
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"status": "failed", "error": f"the build did not end within {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"status": "failed", "error": err[-3000:]}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}
