"""Which settings define a training trajectory, and which only change how it is computed.

Checkpoints of a stage live under ``checkpoints/<training fingerprint>/``: a new attempt resumes
only from a series whose fingerprint matches. The fingerprint hashes what changes the math
(model, data, optimizer and schedule, seed, global batch, precision, the ZeRO layout the
checkpoint shards are written in) and nothing else. Operational settings (logging, checkpoint
cadence, guards, attention kernel, activation checkpointing, the loss kernel, CPUs, and the split
of the global batch into micro-batch x accumulation) can change between attempts: the run
resumes the same series and the loop logs what changed. The data position is counted in blocks,
so a different micro x accumulation split at the same global batch reads exactly the blocks the
uninterrupted run would have.

Every field of the train and compute sections is classified below; a new field must be added to
one of the two sets (a test checks that none is left out).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import PipelineConfig

TRAIN_MATH = frozenset(
    {
        "max_steps",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "seed",
        "method",
        "adapter",
    }
)
"""Train-section fields that change the trajectory (``max_steps`` shapes the cosine). The
adapter's ``merge`` only changes what is exported, and a full-weight section leaves ``method``
and ``adapter`` out, so its fingerprint is the one it had before adapters existed."""
TRAIN_OPERATIONAL = frozenset(
    {
        "micro_batch_size",  # their product (the global batch) is in the fingerprint
        "grad_accum_steps",
        "log_every",
        "checkpoint_every",
        "keep_last",
        "max_bad_steps",
        "spike_factor",
        "spike_steps",
    }
)
COMPUTE_MATH = frozenset({"zero_stage", "offload_optimizer", "offload_params", "precision"})
"""Compute fields that change the arithmetic (precision) or the layout of the checkpoint's
shards, which DeepSpeed cannot load across (ZeRO stage, optimizer or parameter offload)."""
COMPUTE_OPERATIONAL = frozenset(
    {
        "pool",
        "num_workers",  # a different world size is refused with the fix, not silently restarted
        "cpus_per_worker",
        "attention",
        "activation_checkpointing",
        "checkpoint_every_n_layers",
        "cross_entropy",
        "loss_chunk_tokens",
        "compile_layers",
        "local_scratch",
        "plan",
        "gpu_memory_gib",
        "gpus_per_node",
        "host_memory_gb",
        "interconnect_gbit_s",
        "pcie_gbyte_s",
        "max_failures",
        "placement_timeout_minutes",
    }
)
DATA_OPERATIONAL = frozenset({"num_workers", "chunk_bytes", "shard_blocks"})
"""Data fields that change how prepare_data runs, not the blocks it writes."""


def math_settings(config: PipelineConfig, section: str, inputs: list[str]) -> dict[str, Any]:
    """What determines the trajectory of ``section`` trained on ``inputs``."""
    train = getattr(config, section)
    train_math = train.model_dump(mode="json", include=set(TRAIN_MATH))
    if train.method == "full":
        del train_math["method"], train_math["adapter"]
    else:
        del train_math["adapter"]["merge"]
    return {
        "section": section,
        "train": train_math,
        "global_blocks_per_worker": train.micro_batch_size * train.grad_accum_steps,
        "compute": config.compute.model_dump(mode="json", include=set(COMPUTE_MATH)),
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", exclude=set(DATA_OPERATIONAL)),
        "inputs": inputs,
    }


def training_fingerprint(config: PipelineConfig, section: str, inputs: list[str]) -> str:
    """Hash of ``math_settings``: checkpoints resume only within one fingerprint."""
    blob = json.dumps(math_settings(config, section, inputs), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def operational_settings(config: PipelineConfig, section: str) -> dict[str, Any]:
    """The settings an attempt may change without leaving the trajectory (``section.x`` keys)."""
    train = getattr(config, section).model_dump(mode="json", include=set(TRAIN_OPERATIONAL))
    compute = config.compute.model_dump(mode="json", include=set(COMPUTE_OPERATIONAL))
    return {f"{section}.{k}": v for k, v in train.items()} | {
        f"compute.{k}": v for k, v in compute.items()
    }


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each operational setting that differs from the checkpoint's."""
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in sorted(current.items())
        if key in saved and saved[key] != value
    ]
