"""The DeepSpeed training loop that runs inside every Ray Train worker.

Read it top to bottom: ``train_worker`` sets up the model and engine, runs ``max_steps``
optimizer steps over packed blocks, then saves a Hugging Face-format model. Ray Train has already
started the process group (gloo on CPU workers, NCCL on GPUs) when this runs.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import PipelineConfig, TrainConfig, config_from_dict
from pipeline.data.pack import PackedBlocks
from pipeline.data.shards import read_manifest, read_split
from pipeline.train.export import save_model

log = logging.getLogger(__name__)

TRAIN_METRICS_FILE = "train_metrics.json"


@dataclass(frozen=True)
class LoopSpec:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    config: dict[str, Any]
    """Resolved pipeline config (``PipelineConfig.model_dump``)."""
    section: str
    """``cpt`` or ``sft``: which training section of the config applies."""
    model_uri: str
    """Hugging Face-format model folder to start from."""
    tokenizer_uri: str
    """prepare_data's tokenizer, saved next to the trained weights."""
    data_uri: str
    """prepare_data's ``data`` folder (manifest and shards)."""
    split: str
    """Manifest split to train on."""
    output_uri: str
    """Where rank 0 writes the trained model."""
    mlflow_run_id: str


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def global_batches(n_blocks: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Endless global batches of block indices: a fresh seeded permutation every epoch."""
    buffer = np.zeros(0, dtype=np.int64)
    epoch = 0
    while True:
        while len(buffer) < batch:
            perm = np.random.default_rng([seed, epoch]).permutation(n_blocks)
            buffer = np.concatenate([buffer, perm])
            epoch += 1
        yield buffer[:batch]
        buffer = buffer[batch:]


def train_worker(spec_dict: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: setup, train, save."""
    spec = LoopSpec(**spec_dict)
    config = config_from_dict(spec.config)
    train: TrainConfig = getattr(config, spec.section)
    if config.compute.pool == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.train.attention import select_attention
    from pipeline.train.model import count_parameters, load_causal_lm
    from pipeline.train.zero import deepspeed_config

    torch.set_num_threads(config.compute.cpus_per_worker)
    # Wrap Ray Train's process group so ZeRO-3's partitioned loading sees the real world size.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = deepspeed_config(config.compute, train, world)
    # Alive during from_pretrained: ZeRO-3 partitions weights as they load.
    hf_ds = HfDeepSpeedConfig(ds_config) if config.compute.zero_stage == 3 else None
    dtype = torch.bfloat16 if config.compute.precision == "bf16" else torch.float32
    attention = select_attention(config.compute.attention)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = storage.download_dir(spec.model_uri, scratch)
        model = load_causal_lm(model_dir, attention, dtype)
    if config.compute.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train)),
        dist_init_required=False,
    )
    device = engine.device
    blocks = read_split(spec.data_uri, read_manifest(spec.data_uri), spec.split)
    n_params = count_parameters(engine.module)
    if rank == 0:
        log.info(
            "%s: %d params, %d blocks, world %d, attention %s",
            spec.section,
            n_params,
            len(blocks),
            world,
            attention,
        )

    history = train_steps(engine, blocks, train, rank, world, device, spec, config)

    save_model(engine, spec, config, rank)
    del hf_ds
    metrics = {
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "min_loss": min(h["loss"] for h in history),
        "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history[1:] or history])),
        "steps": len(history),
        "parameters": n_params,
        "attention": attention,
        "loss_history": [round(h["loss"], 5) for h in history],
    }
    if rank == 0:
        storage.write_json(storage.join(spec.output_uri, TRAIN_METRICS_FILE), metrics)


def train_steps(
    engine: Any,
    blocks: PackedBlocks,
    train: TrainConfig,
    rank: int,
    world: int,
    device: Any,
    spec: LoopSpec,
    config: PipelineConfig,
) -> list[dict[str, float]]:
    """The optimizer-step loop; returns per-step loss (mean over ranks), lr and tokens/s (global
    tokens over this rank's step time; ranks run in lockstep)."""
    import torch
    import torch.distributed as dist

    from pipeline import tracking

    micro, accum = train.micro_batch_size, train.grad_accum_steps
    batches = global_batches(len(blocks), micro * world, train.seed)
    tokens_per_step = micro * accum * world * blocks.input_ids.shape[1]
    history: list[dict[str, float]] = []
    engine.train()
    for step in range(1, train.max_steps + 1):
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for _ in range(accum):
            index = next(batches)[rank * micro : (rank + 1) * micro]
            batch = {
                key: torch.as_tensor(getattr(blocks, key)[index], dtype=torch.long, device=device)
                for key in ("input_ids", "position_ids", "labels")
            }
            # No attention_mask: position-id restarts mark document boundaries (see pack.py).
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        elapsed = time.perf_counter() - started
        record = {
            "loss": loss_sum.item() / (accum * world),
            "lr": float(engine.get_lr()[0]),
            "tokens_per_s": tokens_per_step / elapsed,
        }
        history.append(record)
        if rank == 0 and (step % train.log_every == 0 or step == train.max_steps):
            log.info("step %d/%d %s", step, train.max_steps, record)
            tracking.log_metrics(config.tracking, spec.mlflow_run_id, record, step=step)
    return history


def spec_dict(spec: LoopSpec) -> dict[str, Any]:
    return asdict(spec)
