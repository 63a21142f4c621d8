"""Shared by the training benchmarks: the real stage entrypoints run in a private workdir
against a private Ray head, and the memory of the processes they start.

``train_throughput.py`` (the ZeRO matrix) and ``sft_vs_hf_trainer.py`` (the SFT comparison)
both run stages through ``run_stage`` on ``configs/demo.yaml`` with ``bench_config``'s
overrides, inside ``private_ray``.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, PipelineConfig, load_config

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
WARMUP_STEPS = 2
"""Steps of the short runs that absorb one-time costs or only make a model to start from."""


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
    from pipeline.identity import write_resolved_config
    from pipeline.stages import continued_pretraining, instruction_finetuning, prepare_data
    from pipeline.stages.entrypoint import stage_main

    run = {
        "prepare_data": prepare_data.run,
        "continued_pretraining": continued_pretraining.run,
        "instruction_finetuning": instruction_finetuning.run,
    }
    argv = ["--config", write_resolved_config(config, run_key), "--run-key", run_key]
    if input_uri is not None:
        argv += ["--input", input_uri]
    with contextlib.redirect_stdout(io.StringIO()):
        result: dict[str, Any] = stage_main(stage, run[stage], argv=argv)
    return result


@contextlib.contextmanager
def private_ray(workdir: Path) -> Iterator[None]:
    """A Ray head of our own (free ports, token auth), connected for this process."""
    from pipeline.devstack.ray_cluster import ray_head

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
