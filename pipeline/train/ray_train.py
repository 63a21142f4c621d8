"""Driver side of a training stage: start the Ray Train workers and collect their result."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import storage
from pipeline.config import ComputeConfig
from pipeline.placement import reserve
from pipeline.train.collectives import process_group_backend
from pipeline.train.loop import ABORT_FILE, TRAIN_METRICS_FILE, LoopSpec, spec_dict, train_worker

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

    When a worker process dies, Ray Train restarts the whole worker group up to
    ``compute.max_failures`` times inside this job; each restart resumes from the newest
    complete checkpoint.

    Raises:
        RuntimeError: a worker failed for good, or the non-finite guard aborted the run; the
            message carries the worker's error or the guard's reason.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    # Ray Train would retry starting a worker group that does not fit for as long as the job
    # lives: fail within the placement timeout instead, naming what the cluster lacks.
    reserve(
        [worker_resources(compute)] * compute.num_workers,
        compute.placement_timeout_minutes,
        f"{compute.num_workers} {compute.pool} training workers",
    )
    # Ray Train keeps only its run bookkeeping there (the loop writes its own checkpoints), so
    # an S3 artifact root leaves it on Ray's local default rather than reaching S3 through
    # another client.
    stage_dir = spec.output_uri.rsplit("/", 1)[0]
    storage_path = None if storage.is_s3(stage_dir) else storage.join(stage_dir, "_ray_train")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec_dict(spec),
        scaling_config=ScalingConfig(
            num_workers=compute.num_workers,
            use_gpu=compute.pool != "cpu",
            resources_per_worker=worker_resources(compute),
        ),
        torch_config=TorchConfig(backend=process_group_backend(use_gpu=compute.pool != "cpu")),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=compute.max_failures),
        ),
    )
    # A stale abort note from an earlier attempt must not fail this one.
    abort_uri = storage.join(spec.output_uri, ABORT_FILE)
    storage.remove(abort_uri)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if storage.exists(abort_uri):
        reason = storage.read_json(abort_uri)["error"]
        raise RuntimeError(f"training aborted: {reason}")
    metrics: dict[str, Any] = storage.read_json(storage.join(spec.output_uri, TRAIN_METRICS_FILE))
    metrics |= planner_calibration(spec, metrics)
    log.info("training finished: %s", {k: v for k, v in metrics.items() if k != "loss_history"})
    return metrics


def planner_calibration(spec: LoopSpec, measured: dict[str, Any]) -> dict[str, float]:
    """The planner's predictions for this stage next to what the run measured, so every run
    shows how far off the plan was (``pipeline plan``); empty when the model cannot be planned.
    """
    from pipeline.config import ConfigError, config_from_dict
    from pipeline.planning.search import predicted_step

    try:
        predicted = predicted_step(config_from_dict(spec.config), spec.section)
    except ConfigError as err:
        log.warning("no planner prediction for this model: %s", err)
        return {}
    ratios = {
        "step_time_ratio": measured.get("step_time_s", 0.0)
        / max(predicted["predicted_step_time_s"], 1e-9),
    }
    log.info(
        "planner predicted %.3f s/step, %.1f GiB GPU, %.1f GiB host; measured %.3f s/step, "
        "%.2f GiB peak",
        predicted["predicted_step_time_s"],
        predicted["predicted_gpu_memory_gib"],
        predicted["predicted_host_memory_gib"],
        measured.get("step_time_s", 0.0),
        measured.get("peak_memory_gib", 0.0),
    )
    return predicted | ratios


def training_summary(metrics: dict[str, Any]) -> list[str]:
    """The lines a training stage's Airflow task log ends with."""

    def num(key: str, fmt: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else format(value, fmt)

    resumed = metrics.get("resumed_from_step")
    return [
        f"steps {metrics.get('steps', '-')} (skipped {metrics.get('skipped_steps', 0)})"
        + (f", resumed from step {resumed}" if resumed else ""),
        f"loss {num('first_loss', '.4f')} -> {num('final_loss', '.4f')}"
        f" (min {num('min_loss', '.4f')})",
        f"tokens seen {metrics.get('tokens_seen', '-')}"
        f" ({metrics.get('target_tokens_seen', '-')} trained on)",
        f"throughput {num('tokens_per_s', ',.0f')} tokens/s, MFU {num('mfu', '.1%')},"
        f" peak memory {num('peak_memory_gib', '.2f')} GiB, attention {metrics.get('attention')}",
        f"checkpoints at steps {metrics.get('checkpoint_steps') or '-'}",
        f"method {metrics.get('method', 'full')}: {num('trainable_parameters', ',')} of "
        f"{num('parameters', ',')} parameters trained",
    ]
