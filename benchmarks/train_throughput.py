"""Training throughput of the project's DeepSpeed trainer, run through Ray Train on CPU workers.

Runs the real stage entrypoints (``prepare_data`` once, then ``continued_pretraining`` once per
setting) on ``configs/demo.yaml`` against a private, token-authenticated Ray head, and reports
tokens/s, seconds per optimizer step, first -> final loss and wall time for a small matrix of
ZeRO stage, optimizer offload and activation checkpointing. A short warm-up run goes first so
that DeepSpeed's one-time JIT build of ``cpu_adam`` (cached in ``~/.cache/torch_extensions``) and
cold imports do not land in the table.

    .venv/bin/python benchmarks/train_throughput.py            # full matrix, ~3.5 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # two settings, 6 steps, ~2 min

Prints a Markdown table and writes JSON (default ``benchmarks/results/train_throughput.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import REPO_ROOT, PipelineConfig, load_config

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "train_throughput.json"
DATA_RUN_KEY = "bench-data"
WARMUP_STEPS = 2


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
QUICK_SETTINGS = (SETTINGS[0], SETTINGS[2])


class PeakRss:
    """Samples the resident memory of this process and all its descendants in a thread.

    The Ray head is started by this process, so its raylet and the Ray Train workers are
    descendants. RSS counts shared pages once per process, so the sum over-estimates.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_tree_mb = 0.0
        self.peak_workers_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, daemon=True)

    def _sample_forever(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            tree = workers = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss = proc.memory_info().rss
                    tree += rss
                    if "RayTrainWorker" in proc.name() or "RayTrainWorker" in " ".join(
                        proc.cmdline()
                    ):
                        workers += rss
            self.peak_tree_mb = max(self.peak_tree_mb, tree / 2**20)
            self.peak_workers_mb = max(self.peak_workers_mb, workers / 2**20)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_config(workdir: Path, overrides: dict[str, Any]) -> PipelineConfig:
    """The demo config with artifacts and MLflow redirected into ``workdir``."""
    private = {
        "storage.artifact_root": str(workdir / "artifacts"),
        "tracking.tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "tracking.artifact_location": str(workdir / "mlruns"),
    }
    return load_config(DEMO_CONFIG, {**private, **overrides})


def run_stage(
    stage: str, config: PipelineConfig, run_key: str, input_uri: str | None
) -> dict[str, Any]:
    """Run one stage through its real entrypoint; returns the committed ``result.json`` dict.

    The entrypoint prints the result as JSON on stdout; that copy is swallowed here.
    """
    from pipeline.stages import common, continued_pretraining, prepare_data

    run = {"prepare_data": prepare_data.run, "continued_pretraining": continued_pretraining.run}
    argv = ["--config", common.write_resolved_config(config, run_key), "--run-key", run_key]
    if input_uri is not None:
        argv += ["--input", input_uri]
    with contextlib.redirect_stdout(io.StringIO()):
        result: dict[str, Any] = common.stage_main(stage, run[stage], argv=argv)
    return result


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


@contextlib.contextmanager
def private_ray(workdir: Path) -> Iterator[None]:
    """A Ray head of our own (free ports, token auth), connected for this process."""
    from pipeline.localstack import ray_head

    with ray_head(workdir / "ray") as head:
        os.environ["RAY_ADDRESS"] = head.gcs_address
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(head.token_path)
        # Ray reads its auth settings when first imported, so import it only now.
        import ray

        # Worker logs stay in the head's session folder; the table is the output.
        ray.init(address=head.gcs_address, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def run_matrix(workdir: Path, settings: tuple[Setting, ...], steps: int) -> dict[str, Any]:
    """prepare_data once, a warm-up run, then one training run per setting.

    Returns:
        ``prepare_data_s``, ``warmup`` (a row) and ``results`` (one row per setting).
    """
    started = time.perf_counter()
    data_config = bench_config(workdir, {})
    run_stage("prepare_data", data_config, DATA_RUN_KEY, None)
    prepare_data_s = round(time.perf_counter() - started, 1)
    data_uri = storage.stage_uri(data_config.storage.artifact_root, DATA_RUN_KEY, "prepare_data")
    print(f"prepare_data done; warm-up ({WARMUP_STEPS} steps of {settings[0].key})", flush=True)
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


def environment() -> dict[str, Any]:
    """Versions and machine facts the figures depend on."""
    import deepspeed
    import ray
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``argv`` ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two settings, 6 steps each")
    parser.add_argument("--steps", type=int, default=None, help="CPT steps per setting (15)")
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
        measured = run_matrix(workdir.resolve(), settings, steps)
    total_s = round(time.perf_counter() - started, 1)
    report = {
        "benchmark": "train_throughput",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/train_throughput.py", *(argv or sys.argv[1:])]),
        "config": str(DEMO_CONFIG.relative_to(REPO_ROOT)),
        "steps": steps,
        # Other work shares these cores; a high load average before the run means noisy figures.
        "environment": {**environment(), "load_average_1m_before": load_before},
        **measured,
        "total_wall_s": total_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(measured["results"]))
    print(
        f"\nprepare_data {measured['prepare_data_s']} s; warm-up {measured['warmup']['wall_s']} s; "
        f"total {total_s} s; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
