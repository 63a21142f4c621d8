"""Driver side of a training stage: start the Ray Train workers and collect their result."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import storage
from pipeline.config import ComputeConfig
from pipeline.train.loop import TRAIN_METRICS_FILE, LoopSpec, spec_dict, train_worker

log = logging.getLogger(__name__)


def worker_resources(compute: ComputeConfig) -> dict[str, float]:
    """Ray resources per worker; GPU pools are custom resources set on the KubeRay worker groups."""
    resources: dict[str, float] = {"CPU": float(compute.cpus_per_worker)}
    if compute.pool != "cpu":
        resources |= {"GPU": 1.0, f"pool_{compute.pool}": 1.0}
    return resources


def fit(spec: LoopSpec, compute: ComputeConfig, name: str) -> dict[str, Any]:
    """Run ``train_worker`` on ``compute.num_workers`` workers; returns rank 0's final metrics
    (first/final loss, loss history, tokens/s), which rank 0 also saved next to the model.

    Raises:
        RuntimeError: a worker failed; the message carries the worker's error.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    storage_path = storage.join(spec.output_uri.rsplit("/", 1)[0], "_ray_train")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec_dict(spec),
        scaling_config=ScalingConfig(
            num_workers=compute.num_workers,
            use_gpu=compute.pool != "cpu",
            resources_per_worker=worker_resources(compute),
        ),
        torch_config=TorchConfig(backend="gloo" if compute.pool == "cpu" else "nccl"),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    metrics: dict[str, Any] = storage.read_json(storage.join(spec.output_uri, TRAIN_METRICS_FILE))
    log.info("training finished: %s", {k: v for k, v in metrics.items() if k != "loss_history"})
    return metrics
