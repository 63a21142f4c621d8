"""The DeepSpeed training recipe that runs inside every Ray Train worker.

Read it top to bottom: ``train_worker`` builds a ``TrainingRecipe`` and runs ``setup`` (engine,
data, resume from the newest complete checkpoint), ``train`` (optimizer steps, checkpoints, the
non-finite guard), then ``finish`` (wait for uploads, export the model, write the metrics). Ray
Train has already started the process group (gloo on CPU workers, NCCL on GPUs) when it runs;
when a worker dies, Ray Train restarts the group and ``setup`` resumes where the last complete
checkpoint left off.

The loss of a step is the sum of every target token's loss over all micro-batches, accumulation
steps and ranks, divided by the number of target tokens in the whole step: an SFT block with 5
target tokens weighs 5 tokens, not as much as a block with 4,000.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import PipelineConfig, TrainConfig, config_from_dict
from pipeline.data.chat import IGNORE_INDEX
from pipeline.data.shards import read_manifest, read_split
from pipeline.train import faults
from pipeline.train.checkpoint import CheckpointStore, tag_for
from pipeline.train.data_order import DataOrder
from pipeline.train.export import save_model

log = logging.getLogger(__name__)

TRAIN_METRICS_FILE = "train_metrics.json"
ABORT_FILE = "train_aborted.json"


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
    checkpoint_uri: str
    """The stage's ``checkpoints`` folder; each training fingerprint gets its own series."""
    mlflow_run_id: str
    """Stage run that gets the step metrics; empty to log to the job log only."""


class TrainingAborted(RuntimeError):
    """The guard stopped a diverging run; the message names the step and the last checkpoint."""


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where a checkpoint left off."""

    step: int = 0
    """Optimizer steps done, skipped ones included."""
    samples: int = 0
    """Position in the data order: blocks consumed by all ranks."""
    tokens: int = 0
    """Tokens in the consumed blocks, padding included."""
    target_tokens: int = 0
    """Tokens trained on (labels not masked)."""
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    spike_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per step: loss (None when skipped), lr applied, grad norm, data digest."""


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def training_fingerprint(spec: LoopSpec, config: PipelineConfig) -> str:
    """Hash of what determines the training trajectory; checkpoints resume only within it."""
    relevant = {
        "section": spec.section,
        "train": getattr(config, spec.section).model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        # The worker count is left out on purpose: a run restarted with another world size
        # finds its checkpoints and is told how to resume them, instead of silently starting over.
        "compute": config.compute.model_dump(mode="json", exclude={"max_failures", "num_workers"}),
        "inputs": [spec.model_uri, spec.data_uri, spec.split],
    }
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:16]


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over unmasked labels (0 when none: never NaN)."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def is_loss_spike(earlier: list[float], loss: float, factor: float, min_history: int) -> bool:
    """Whether ``loss`` is above ``factor`` times the mean of the last 100 earlier losses (with
    at least ``min_history`` of them, so warm-up noise does not count)."""
    window = earlier[-100:]
    return len(window) >= min_history and loss > factor * sum(window) / len(window)


def train_worker(spec_dict: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: setup, train, finish."""
    recipe = TrainingRecipe(LoopSpec(**spec_dict))
    recipe.setup()
    try:
        recipe.train()
    except TrainingAborted as err:
        # Returning normally keeps Ray Train from restarting a run that would diverge again;
        # the driver reads this file and fails the stage with the message.
        if recipe.rank == 0:
            storage.write_json(
                storage.join(recipe.spec.output_uri, ABORT_FILE), {"error": str(err)}
            )
        log.error("%s", err)
        recipe.checkpoints.wait()
        return
    recipe.finish()


class TrainingRecipe:
    def __init__(self, spec: LoopSpec) -> None:
        self.spec = spec
        self.config = config_from_dict(spec.config)
        self.train_cfg: TrainConfig = getattr(self.config, spec.section)
        self.faults = faults.active_faults()
        self.resumed_from = 0
        self.state = TrainState()
        self.attempt_records: list[dict[str, Any]] = []
        """Applied steps of this attempt (a resumed attempt times only its own steps)."""
        self.checkpoint_steps: list[int] = []
        self.first_step_reads: dict[str, int] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        from pipeline.train.attention import select_attention
        from pipeline.train.model import count_parameters

        config = self.config
        if config.compute.pool == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        elif torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            # DeepSpeed's JIT op builds parse torch's arch list, which can hold "9.0a" and fail.
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        import deepspeed

        torch.set_num_threads(config.compute.cpus_per_worker)
        # Wrap Ray Train's process group so ZeRO-3's partitioned loading sees the real world size.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.attention = select_attention(config.compute.attention)
        self.engine = self._build_engine()
        self.device = self.engine.device
        # One checksum pass per node (the first local rank); the others map the same files.
        verify = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self.blocks = read_split(
            self.spec.data_uri, read_manifest(self.spec.data_uri), self.spec.split, verify=verify
        )
        self.order = DataOrder(len(self.blocks), self.train_cfg.seed)
        self.n_params = count_parameters(self.engine.module)
        model_cfg = self.engine.module.config
        self.flops_per_token = _flops_per_token(self.n_params, model_cfg, config.data.seq_len)
        fingerprint = training_fingerprint(self.spec, config)
        self.checkpoint_root = storage.join(self.spec.checkpoint_uri, fingerprint)
        self.checkpoints = CheckpointStore(
            self.checkpoint_root, self.train_cfg.keep_last, self.rank, self.world
        )
        self._resume()
        if self.rank == 0:
            log.info(
                "%s: %d params, %d blocks, world %d, attention %s, checkpoints %s",
                self.spec.section,
                self.n_params,
                len(self.blocks),
                self.world,
                self.attention,
                self.checkpoint_root,
            )

    def _build_engine(self) -> Any:
        import deepspeed
        import torch
        from transformers.integrations import HfDeepSpeedConfig

        from pipeline.train.model import fetch_model, load_training_model
        from pipeline.train.zero import deepspeed_config, initialize_engine

        config = self.config
        ds_config = deepspeed_config(config.compute, self.train_cfg, self.world)
        # Alive during from_pretrained: ZeRO-3 partitions weights as they load.
        self._hf_ds = HfDeepSpeedConfig(ds_config) if config.compute.zero_stage == 3 else None
        dtype = torch.bfloat16 if config.compute.precision == "bf16" else torch.float32
        model_dir = fetch_model(self.spec.model_uri, config.tracking)
        tokenizer_dir = fetch_model(self.spec.tokenizer_uri, config.tracking)
        model = load_training_model(
            model_dir, tokenizer_dir, self.attention, dtype, config.compute.zero_stage
        )
        if config.compute.activation_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        del deepspeed  # imported first so that its accelerator choice sees DS_ACCELERATOR
        return initialize_engine(
            model,
            ds_config,
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.train_cfg)),
        )

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint of this training fingerprint, if any."""
        import torch
        import torch.distributed as dist

        store = self.checkpoints
        latest = store.latest_step()
        if self.rank == 0:
            store.remove_incomplete()
        dist.barrier()
        if latest is None:
            return
        saved = store.read_loop_state(latest)
        if saved["world_size"] != self.world:
            raise ValueError(
                f"checkpoint {tag_for(latest)} at {self.checkpoint_root} was written by "
                f"{saved['world_size']} workers and this attempt has {self.world}: ZeRO shards "
                f"are per rank. Set compute.num_workers={saved['world_size']} to resume it, or "
                "convert it with DeepSpeed's ds_to_universal.py and start a new run from it."
            )
        local = store.local_copy(latest)
        load_path, _ = self.engine.load_checkpoint(str(local), tag=tag_for(latest))
        if load_path is None:
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {tag_for(latest)} from {local}"
            )
        rng = torch.load(local / tag_for(latest) / f"rank{self.rank}_rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.state = TrainState(**saved["state"])
        self.resumed_from = latest
        if self.rank == 0:
            log.info(
                "resumed from step %d of %d (checkpoint %s)",
                latest,
                self.train_cfg.max_steps,
                storage.join(self.checkpoint_root, tag_for(latest)),
            )
            self._log_mlflow({"resumed_from_step": float(latest)}, step=latest)
            if self.spec.mlflow_run_id:
                from pipeline import tracking

                tracking.client(self.config.tracking).set_tag(
                    self.spec.mlflow_run_id, "resumed_from_step", str(latest)
                )

    # -- train ---------------------------------------------------------------------------------

    def train(self) -> None:
        train = self.train_cfg
        self.engine.train()
        while self.state.step < train.max_steps:
            record = self.train_step()
            self._guard(record)
            step = self.state.step
            if self.rank == 0 and (step % train.log_every == 0 or step == train.max_steps):
                self._log_step(record)
            # No checkpoint inside a streak of skipped or spiking steps: the last good one stays
            # the newest, and an abort names it.
            streak = self.state.bad_in_a_row or self.state.spike_in_a_row
            if (step % train.checkpoint_every == 0 or step == train.max_steps) and not streak:
                self.save_checkpoint()
            faults.maybe_kill(self.faults, "sigkill", self.rank, step, self.checkpoint_root)
            faults.maybe_stall(self.faults, self.rank, step, self.checkpoint_root)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum_steps`` micro-batches on every rank."""
        micro, accum, world = (
            self.train_cfg.micro_batch_size,
            self.train_cfg.grad_accum_steps,
            self.world,
        )
        step, start = self.state.step + 1, self.state.samples
        batches = [
            self._batch(self.order.micro_batch(start, micro, m, self.rank, world))
            for m in range(accum)
        ]
        self._note_first_reads(step, micro * accum)
        n_targets = self._global_target_tokens(batches)
        lr = float(self.engine.get_lr()[0])  # the scheduler moves after the step: this one applies
        skipped_before = self.engine.skipped_steps
        started = time.perf_counter()
        empty = n_targets == 0  # every label masked: nothing to learn, not a failure
        loss_sum = None if empty else self._accumulate(batches, step, n_targets)
        elapsed = time.perf_counter() - started
        applied = loss_sum is not None and self.engine.skipped_steps == skipped_before
        grad_norm = self.engine.get_global_grad_norm() if applied else None
        tokens = micro * accum * world * self.blocks.input_ids.shape[1]
        self.state.step, self.state.samples = step, start + micro * accum * world
        self.state.tokens += tokens
        if applied:
            self.state.target_tokens += n_targets
        digest = hashlib.sha1(self.order.indices(start, micro * accum * world).tobytes())
        record: dict[str, Any] = {
            "step": step,
            "loss": loss_sum / n_targets if applied and loss_sum is not None else None,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "target_tokens": n_targets,
            "tokens_per_s": tokens / elapsed,
            "target_tokens_per_s": n_targets / elapsed,
            "step_time_s": elapsed,
            "skipped": not applied,
            "empty": empty,
            "data": digest.hexdigest()[:12],
        }
        self.state.history.append(record)
        if applied:
            self.attempt_records.append(record)
        return record

    def _global_target_tokens(self, batches: list[dict[str, Any]]) -> int:
        """Target tokens of this step on all ranks: the loss's denominator, known before any
        forward pass (labels only)."""
        import torch
        import torch.distributed as dist

        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        counts = torch.tensor([float(local)], dtype=torch.float64)
        dist.all_reduce(counts)
        return int(counts.item())

    def _accumulate(self, batches: list[dict[str, Any]], step: int, n_targets: int) -> float | None:
        """Forward and backward every micro-batch; returns the summed token loss of all ranks,
        or None when a loss was non-finite on any rank (the step's gradients are dropped)."""
        import torch
        import torch.distributed as dist

        engine, world = self.engine, self.world
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, batch in enumerate(batches):
            token_loss = self._forward_loss_sum(batch)
            if faults.should_poison_loss(self.faults, self.rank, step, m):
                token_loss = token_loss * float("nan")
            finite = torch.tensor([float(torch.isfinite(token_loss).item())])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1.0:
                _discard_gradients(engine, m)
                return None
            # DeepSpeed averages gradients over ranks: multiply by world so the result is the
            # gradient of (sum of token losses) / (target tokens in the whole step).
            engine.backward(token_loss * (world / n_targets), scale_wrt_gas=False)
            engine.step()
            loss_sum += token_loss.detach().double().cpu()
        dist.all_reduce(loss_sum)
        return float(loss_sum.item())

    def _note_first_reads(self, step: int, blocks: int) -> None:
        """Record (and log) what the first step of this attempt read: the cost of resuming."""
        if self.first_step_reads:
            return
        self.first_step_reads = {
            "blocks_read": blocks,
            "permutations_built": self.order.permutations_built,
        }
        if self.rank == 0:
            log.info(
                "first step of this attempt (step %d) read %d blocks per rank and built %d "
                "data-order permutation(s)",
                step,
                blocks,
                self.order.permutations_built,
            )

    def _batch(self, index: np.ndarray) -> dict[str, Any]:
        import torch

        return {
            key: torch.as_tensor(getattr(self.blocks, key)[np.sort(index)], dtype=torch.long)
            for key in ("input_ids", "position_ids", "labels")
        }

    def _forward_loss_sum(self, batch: dict[str, Any]) -> Any:
        from pipeline.train.attention import packed_model_inputs

        ids = batch["input_ids"].to(self.device)
        inputs = packed_model_inputs(ids, batch["position_ids"].to(self.device), self.attention)
        logits = self.engine(**inputs).logits.reshape(ids.shape[0], ids.shape[1], -1)
        return token_loss_sum(logits, batch["labels"].to(self.device))

    def _guard(self, record: dict[str, Any]) -> None:
        """Count skipped steps; abort on too many in a row or on a sustained loss spike."""
        train, state = self.train_cfg, self.state
        if record["empty"]:
            state.skipped_steps += 1
            log.warning("step %d skipped: its blocks hold no target tokens", record["step"])
            return
        if record["skipped"]:
            state.skipped_steps += 1
            state.bad_in_a_row += 1
            log.warning("step %d skipped: non-finite loss or gradients", record["step"])
            if state.bad_in_a_row > train.max_bad_steps:
                first = record["step"] - state.bad_in_a_row + 1
                raise TrainingAborted(
                    f"{self.spec.section}: {state.bad_in_a_row} steps in a row with a non-finite "
                    f"loss (steps {first}-{record['step']}), more than "
                    f"{self.spec.section}.max_bad_steps={train.max_bad_steps}; "
                    f"aborted at step {record['step']}. {self._last_good()}"
                )
            return
        state.bad_in_a_row = 0
        if train.spike_factor is None:
            return
        earlier = [h["loss"] for h in state.history[:-1] if h["loss"] is not None]
        if is_loss_spike(earlier, record["loss"], train.spike_factor, train.spike_steps):
            state.spike_in_a_row += 1
        else:
            state.spike_in_a_row = 0
        if state.spike_in_a_row >= train.spike_steps:
            raise TrainingAborted(
                f"{self.spec.section}: loss above {train.spike_factor}x its running mean for "
                f"{state.spike_in_a_row} steps (to step {record['step']}, loss "
                f"{record['loss']:.4f}); aborted. {self._last_good()}"
            )

    def _last_good(self) -> str:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return "No checkpoint was written yet."
        return f"Last good checkpoint: {storage.join(self.checkpoint_root, tag_for(latest))}."

    def _log_step(self, record: dict[str, Any]) -> None:
        from pipeline.train.throughput import mfu, peak_memory_gib

        util = mfu(
            record["tokens_per_s"] / self.world, self.flops_per_token, self.config.compute.pool
        )
        memory = peak_memory_gib(self.device.type)
        loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
        log.info(
            "step %d/%d loss %s lr %.3e grad_norm %s tokens/s %.0f target tokens/s %.0f "
            "mfu %s peak memory %.2f GiB skipped steps %d",
            record["step"],
            self.train_cfg.max_steps,
            loss,
            record["lr"],
            "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
            record["tokens_per_s"],
            record["target_tokens_per_s"],
            "n/a (cpu)" if util is None else f"{100 * util:.1f}%",
            memory,
            self.state.skipped_steps,
        )
        numeric = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        numeric |= {"peak_memory_gib": memory, "skipped_steps": float(self.state.skipped_steps)}
        if util is not None:
            numeric["mfu"] = util
        self._log_mlflow(numeric, step=record["step"])

    def _log_mlflow(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0 and self.spec.mlflow_run_id:
            from pipeline import tracking

            tracking.log_metrics(self.config.tracking, self.spec.mlflow_run_id, metrics, step=step)

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        import torch

        step = self.state.step
        self._check_weights_finite(f"checkpoint at step {step}")
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        loop_state = {
            "step": step,
            "max_steps": self.train_cfg.max_steps,
            "world_size": self.world,
            "section": self.spec.section,
            "state": asdict(self.state),
        }
        waited = self.checkpoints.save(self.engine, step, loop_state, rng, self.faults)
        self.checkpoint_steps.append(step)
        if self.rank == 0:
            log.info("checkpoint step %d written (the loop waited %.2f s)", step, waited)
            self._log_mlflow({"checkpoint_step": float(step), "checkpoint_save_s": waited}, step)

    def _check_weights_finite(self, what: str) -> None:
        """Refuse to persist non-finite weights (ZeRO-3: each rank checks its own partition)."""
        import torch
        import torch.distributed as dist

        bad = torch.zeros(1)
        for param in self.engine.module.parameters():
            local = getattr(param, "ds_tensor", param)
            if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                bad += 1
        dist.all_reduce(bad)
        if bad.item() > 0:
            raise TrainingAborted(
                f"{self.spec.section}: non-finite weights at step {self.state.step}; "
                f"refusing to write the {what}. {self._last_good()}"
            )

    # -- finish ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for checkpoint uploads, export the model, write the metrics (rank 0)."""
        self.checkpoints.wait()
        self._check_weights_finite("model export")
        save_model(self.engine, self.spec, self.config, self.rank)
        del self._hf_ds
        if self.rank == 0:
            storage.write_json(
                storage.join(self.spec.output_uri, TRAIN_METRICS_FILE), self._final_metrics()
            )

    def _final_metrics(self) -> dict[str, Any]:
        """Losses over every step of the run (resumed attempts included); speed over the
        applied steps of this attempt, its first (warm-up) step left out."""
        from pipeline.train.throughput import mfu, peak_memory_gib

        history = self.state.history
        losses = [h["loss"] for h in history if h["loss"] is not None]
        timed = self.attempt_records[1:] or self.attempt_records
        step_time = float(np.mean([r["step_time_s"] for r in timed])) if timed else 0.0
        tokens_per_s = float(np.mean([r["tokens_per_s"] for r in timed])) if timed else 0.0
        return {
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "min_loss": min(losses) if losses else None,
            "steps": len(history),
            "skipped_steps": self.state.skipped_steps,
            "grad_norm": history[-1]["grad_norm"] if history else None,
            "tokens_seen": self.state.tokens,
            "target_tokens_seen": self.state.target_tokens,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "target_tokens_per_s": float(np.mean([r["target_tokens_per_s"] for r in timed]))
            if timed
            else 0.0,
            "mfu": mfu(tokens_per_s / self.world, self.flops_per_token, self.config.compute.pool),
            "peak_memory_gib": peak_memory_gib(self.device.type),
            "parameters": self.n_params,
            "attention": self.attention,
            "resumed_from_step": self.resumed_from,
            "checkpoint_steps": self.checkpoint_steps,
            "checkpoint_uri": self.checkpoint_root,
            "first_step_reads": self.first_step_reads,
            "loss_history": [None if h["loss"] is None else round(h["loss"], 6) for h in history],
            "lr_history": [h["lr"] for h in history],
            "data_order": [h["data"] for h in history],
        }


def _flops_per_token(n_params: int, model_cfg: Any, seq_len: int) -> float:
    from pipeline.train.throughput import flops_per_token

    return flops_per_token(n_params, model_cfg.num_hidden_layers, model_cfg.hidden_size, seq_len)


def _discard_gradients(engine: Any, accumulated: int) -> None:
    """Drop the gradients accumulated so far in a step that turned out non-finite.

    The micro-batches before the bad one already ran backward (``accumulated`` of them): their
    gradients sit in DeepSpeed's buffers and its micro-step counter has moved. Both go back to
    the start of the step, so the next step is a clean optimizer step.
    """
    if accumulated == 0:
        return
    optimizer = engine.optimizer
    if hasattr(optimizer, "_overflow_clean_up"):  # ZeRO-3: grads, offload buffers, counters
        optimizer._overflow_clean_up(getattr(optimizer, "loss_scale", 1.0))
    else:
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "cpu_offload", False):
            optimizer.reset_cpu_buffers()
        elif hasattr(optimizer, "averaged_gradients"):
            optimizer.averaged_gradients = {}
    engine.zero_grad()
    engine.micro_steps -= accumulated


def spec_dict(spec: LoopSpec) -> dict[str, Any]:
    return asdict(spec)
