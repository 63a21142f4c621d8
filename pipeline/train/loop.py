"""The DeepSpeed training recipe that runs inside every Ray Train worker.

Read it top to bottom: ``train_worker`` builds a ``TrainingRecipe`` and runs ``setup`` (engine,
data, resume from the newest complete checkpoint), ``train`` (optimizer steps, checkpoints, the
non-finite guard), then ``finish`` (wait for uploads, export the model, write the metrics). Ray
Train has already started the process group (gloo on CPU workers, ``cpu:gloo,cuda:nccl`` on
GPUs, see ``collectives.py``) when it runs; when a worker dies, Ray Train restarts the group and
``setup`` resumes where the last complete checkpoint left off.

The loss of a step is the sum of every target token's loss over all micro-batches, accumulation
steps and ranks, divided by the number of target tokens in the whole step: an SFT block with 5
target tokens weighs 5 tokens, not as much as a block with 4,000. A mixture-of-experts model
adds its router's load-balancing loss times the model's ``router_aux_loss_coef``, weighted the
same way over the step's real tokens, and logs it apart (``aux_loss``).

A step reads the host once, after its last backward (``collectives.step_totals``): the loss
sums and the finite check of every rank come back together, and a non-finite step drops all
of its gradients before the optimizer would apply them.

The learning-rate schedule follows the step counter, skipped steps included: step ``s`` always
applies the schedule's value for ``s``, so the cosine reaches its floor at ``max_steps`` however
many steps a non-finite loss skipped, and a run with skips applies the same rates as one without.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import TrainConfig, config_from_dict
from pipeline.data.shards import read_manifest, read_split
from pipeline.train import faults, trajectory
from pipeline.train.checkpoint import (
    CheckpointStore,
    refuse_node_local_root,
    restore_rng,
    rng_snapshot,
    tag_for,
)
from pipeline.train.collectives import host_sums, step_totals
from pipeline.train.data_order import DataOrder
from pipeline.train.export import save_adapter_model, save_model
from pipeline.train.objective import LossRows, loss_rows
from pipeline.train.records import StepRecord, TrainState, is_loss_spike, summarize

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


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


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
        self.attempt_records: list[StepRecord] = []
        """Applied steps of this attempt (a resumed attempt times only its own steps)."""
        self.checkpoint_steps: list[int] = []
        self.first_step_reads: dict[str, int] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch
        import torch.distributed as dist

        from pipeline.train.attention import select_attention
        from pipeline.train.lora import trainable_parameters
        from pipeline.train.model import count_parameters
        from pipeline.train.throughput import model_flops_per_token

        config = self.config
        # DeepSpeed JIT-builds its ops with the first `ninja` on PATH. Two ninja versions (the
        # system's and this environment's) hash build commands differently, so processes that
        # find different ones rebuild cpu_adam for each other (minutes each): always use ours.
        env_bin = str(Path(sys.executable).parent)
        if (Path(env_bin) / "ninja").exists() and not os.environ["PATH"].startswith(env_bin):
            os.environ["PATH"] = f"{env_bin}{os.pathsep}{os.environ['PATH']}"
        if config.compute.pool == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        elif torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            # DeepSpeed's JIT op builds parse torch's arch list, which can hold "9.0a" and fail.
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        import deepspeed

        from pipeline.train.zero import cache_cpu_info

        cache_cpu_info()

        torch.set_num_threads(config.compute.cpus_per_worker)
        # Wrap Ray Train's process group so ZeRO-3's partitioned loading sees the real world size.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        refuse_node_local_root(self.spec.checkpoint_uri, self.spec.section, self.world)
        self.attention = select_attention(config.compute.attention)
        self.engine = self._build_engine()
        self.device = self.engine.device
        # One checksum pass per node (the first local rank); the others map the same files.
        verify = int(os.environ.get("LOCAL_RANK", "0")) == 0
        self.blocks = read_split(
            self.spec.data_uri, read_manifest(self.spec.data_uri), self.spec.split, verify=verify
        )
        self.order = DataOrder(len(self.blocks), self.train_cfg.seed)
        self.n_params = count_parameters(self.model)
        self.n_trainable = trainable_parameters(self.model)
        self.flops_per_token = model_flops_per_token(self.model.config, config.data.seq_len)
        inputs = [self.spec.model_uri, self.spec.data_uri, self.spec.split]
        fingerprint = trajectory.training_fingerprint(config, self.spec.section, inputs)
        self.checkpoint_root = storage.join(self.spec.checkpoint_uri, fingerprint)
        self.checkpoints = CheckpointStore(
            self.checkpoint_root,
            self.train_cfg.keep_last,
            self.rank,
            self.world,
            config.compute.local_scratch,
            adapter_only=self.train_cfg.method != "full",
        )
        # Adapter dropout draws from torch's generator: start each rank's from the seed (a
        # resume restores the checkpoint's state instead), not from whatever ran before.
        torch.manual_seed(self.train_cfg.seed + self.rank)
        self._resume()
        if self.rank == 0:
            log.info(
                "%s: %s, %d params (%d trained), %d blocks, world %d, attention %s, "
                "cross-entropy %s, checkpoints %s",
                self.spec.section,
                self.train_cfg.method,
                self.n_params,
                self.n_trainable,
                len(self.blocks),
                self.world,
                self.attention,
                self.cross_entropy,
                self.checkpoint_root,
            )

    def _build_engine(self) -> Any:
        import deepspeed
        import torch

        from pipeline.models import fetch_model
        from pipeline.train import lora, zero
        from pipeline.train.model import load_training_model
        from pipeline.train.objective import make_objective, resolve_cross_entropy

        config, compute, train = self.config, self.config.compute, self.train_cfg
        # Fetched first: an adapter-only input is merged onto its base here, whole, on the CPU.
        self.model_dir = fetch_model(self.spec.model_uri, config.tracking)
        self.tokenizer_dir = fetch_model(self.spec.tokenizer_uri, config.tracking)
        ds_config = zero.deepspeed_config(compute, train, self.world)
        # Alive from loading to the export (ZeRO-3 only).
        self._partitioned_loading = zero.partitioned_loading(ds_config)
        dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
        model, base_vocab = load_training_model(
            self.model_dir,
            self.tokenizer_dir,
            self.attention,
            dtype,
            lora.quantization_config(train, dtype),
        )
        if train.method != "full":
            model = self._attach_adapter(model, base_vocab)
        zero.partition_loaded_model(model, compute.zero_stage)
        layers = model.get_decoder().layers
        if compute.activation_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            # Selective checkpointing: the layers in between keep their activations.
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = index % compute.checkpoint_every_n_layers == 0
        if compute.compile_layers:
            for layer in layers:
                layer.compile()
        device_type = "cpu" if compute.pool == "cpu" else "cuda"
        self.cross_entropy = resolve_cross_entropy(
            compute.cross_entropy, device_type, compute.zero_stage
        )
        self.model = model
        objective = make_objective(model, self.cross_entropy, compute.loss_chunk_tokens)
        self.aux_coef: float | None = objective.aux_coef
        del deepspeed  # imported first so that its accelerator choice sees DS_ACCELERATOR
        return zero.initialize_engine(
            objective,
            zero.optimizer_param_groups(model, train.weight_decay),
            ds_config,
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train)),
        )

    def _attach_adapter(self, model: Any, base_vocab: int) -> Any:
        """Freeze the loaded model and wrap it with the section's LoRA adapter (``lora.py``).

        Raises:
            ValueError: the tokenizer grew the embeddings and ``train_chat_tokens`` is off:
                the new rows would stay random and the merged export could not reproduce them.
        """
        from pipeline.data.tokenizer import load_tokenizer
        from pipeline.train import lora

        adapter, section = self.train_cfg.adapter, self.spec.section
        tok = load_tokenizer(self.tokenizer_dir)
        grown = len(tok) - base_vocab
        if grown > 0 and not adapter.train_chat_tokens:
            raise ValueError(
                f"{section}.adapter.train_chat_tokens is off, but the tokenizer adds {grown} "
                f"tokens to the base model's {base_vocab}: their embedding and LM-head rows "
                "would stay random. Turn train_chat_tokens on."
            )
        fmt = self.config.data.chat_format
        token_ids = lora.chat_token_ids(tok, fmt, base_vocab) if adapter.train_chat_tokens else []
        return lora.attach(
            model, adapter, token_ids, self.train_cfg.seed, self._partitioned_loading
        )

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint of this training fingerprint, if any."""
        import torch.distributed as dist

        store = self.checkpoints
        latest = store.agreed_latest()
        if self.rank == 0:
            store.remove_incomplete()
        dist.barrier()
        if latest is None:
            return
        # Each file is checked against the manifests, then unpickled weights-only (or refused).
        saved = store.read_loop_state(latest)
        if saved["world_size"] != self.world:
            raise ValueError(
                f"checkpoint {tag_for(latest)} at {self.checkpoint_root} was written by "
                f"{saved['world_size']} workers and this attempt has {self.world}: ZeRO shards "
                f"are per rank. Set compute.num_workers={saved['world_size']} to resume it, or "
                "convert it with DeepSpeed's ds_to_universal.py and start a new run from it."
            )
        local, tag = store.local_copy(latest), tag_for(latest)
        try:
            store.load_engine(self.engine, local, latest)
            rng_file = local / tag / f"rank{self.rank}_rng.pt"
            restore_rng(rng_file, storage.join(self.checkpoint_root, tag))
        finally:
            store.release_local_copy()
        self.state = TrainState.from_dict(saved["state"])
        self.resumed_from = latest
        if self.rank == 0:
            self._log_resume(latest, saved)

    def _log_resume(self, latest: int, saved: dict[str, Any]) -> None:
        changed = trajectory.changed_settings(
            saved.get("operational", {}),
            trajectory.operational_settings(self.config, self.spec.section),
        )
        log.info(
            "resumed from step %d of %d (checkpoint %s)%s",
            latest,
            self.train_cfg.max_steps,
            storage.join(self.checkpoint_root, tag_for(latest)),
            "; same trajectory, changed settings: " + "; ".join(changed) if changed else "",
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

    def train_step(self) -> StepRecord:
        """One optimizer step over ``grad_accum_steps`` micro-batches on every rank."""
        micro, accum, world = (
            self.train_cfg.micro_batch_size,
            self.train_cfg.grad_accum_steps,
            self.world,
        )
        step, start = self.state.step + 1, self.state.samples
        batches = [
            self._host_batch(self.order.micro_batch(start, micro, m, self.rank, world))
            for m in range(accum)
        ]
        self._note_first_reads(step, micro * accum)
        # The loss's denominators, known before any forward pass (labels only, on the host).
        n_targets, n_real = host_sums(
            [sum(r.n_targets for _, r in batches), sum(r.n_real for _, r in batches)]
        )
        lr = float(self.engine.get_lr()[0])  # the scheduler moves after the step: this one applies
        started = time.perf_counter()
        empty = n_targets == 0  # every label masked: nothing to learn, not a failure
        totals = None if empty else self._accumulate(batches, step, n_targets, n_real)
        applied = totals is not None
        if not applied:
            self.engine.lr_scheduler.step()  # see the module docstring: the schedule follows steps
        elapsed = time.perf_counter() - started
        tokens = micro * accum * world * self.blocks.input_ids.shape[1]
        self.state.step, self.state.samples = step, start + micro * accum * world
        self.state.tokens += tokens
        if applied:
            self.state.target_tokens += n_targets
        digest = hashlib.sha1(self.order.indices(start, micro * accum * world).tobytes())
        grad_norm = self.engine.get_global_grad_norm() if applied else None
        record = StepRecord(
            step=step,
            loss=totals[0] / n_targets if totals else None,
            aux_loss=totals[1] / n_real if totals and self.aux_coef is not None else None,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            target_tokens=n_targets,
            tokens_per_s=tokens / elapsed,
            target_tokens_per_s=n_targets / elapsed,
            step_time_s=elapsed,
            skipped=not applied,
            empty=empty,
            data=digest.hexdigest()[:12],
        )
        self.state.history.append(record)
        if applied:
            self.attempt_records.append(record)
        return record

    def _accumulate(
        self,
        batches: list[tuple[dict[str, np.ndarray], LossRows]],
        step: int,
        n_targets: int,
        n_real: int,
    ) -> list[float] | None:
        """Forward and backward every micro-batch, then read the step's sums of all ranks once:
        [cross-entropy over target tokens, router loss over real tokens]. Returns None when a
        sum is non-finite (on any rank): the step's gradients are dropped, nothing is applied.
        """
        import torch

        from pipeline.train.zero import discard_step_gradients

        engine, world, coef = self.engine, self.world, self.aux_coef
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for m, (batch, rows) in enumerate(batches):
            ce, aux = engine(**self._device_inputs(batch, rows))
            if faults.should_poison_loss(self.faults, self.rank, step, m):
                ce = ce * float("nan")
            # DeepSpeed averages gradients over ranks: multiply by world so the result is the
            # gradient of (sum of token losses) / (target tokens in the whole step).
            objective = ce * (world / n_targets)
            if coef is not None:
                objective = objective + aux * (coef * world / max(n_real, 1))
            engine.backward(objective, scale_wrt_gas=False)
            sums += torch.stack([ce.detach(), aux.detach()]).double()
            if m < len(batches) - 1:
                engine.step()  # accumulates; the optimizer runs at the last micro-batch only
        totals = step_totals(sums)
        if not all(math.isfinite(v) for v in totals):
            discard_step_gradients(engine, len(batches) - 1)
            return None
        engine.step()
        return totals

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

    def _host_batch(self, index: np.ndarray) -> tuple[dict[str, np.ndarray], LossRows]:
        """A micro-batch's blocks as host arrays, and the rows its loss reads."""
        rows = np.sort(index)
        batch = {key: getattr(self.blocks, key)[rows] for key in ("input_ids", "position_ids")}
        labels = self.blocks.labels[rows]
        pad = self.model.config.pad_token_id
        return batch, loss_rows(
            labels, batch["input_ids"], pad, self.config.compute.loss_chunk_tokens
        )

    def _device_inputs(self, batch: dict[str, np.ndarray], rows: LossRows) -> dict[str, Any]:
        """The objective's keyword arguments, copied to the device without waiting for it."""
        import torch

        from pipeline.train.attention import packed_model_inputs

        def on_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(array, dtype=dtype).to(self.device, non_blocking=True)

        ids = on_device(batch["input_ids"], torch.long)
        positions = on_device(batch["position_ids"], torch.long)
        return {
            "rows": rows,
            "index": on_device(rows.index, torch.long),
            "targets": on_device(rows.targets, torch.long),
            "real_tokens": on_device(rows.real_tokens, torch.float32),
            **packed_model_inputs(ids, positions, self.attention),
        }

    def _guard(self, record: StepRecord) -> None:
        """Count skipped steps; abort on too many in a row or on a sustained loss spike."""
        train, state = self.train_cfg, self.state
        if record.empty:
            state.skipped_steps += 1
            log.warning("step %d skipped: its blocks hold no target tokens", record.step)
            return
        if record.skipped:
            state.skipped_steps += 1
            state.bad_in_a_row += 1
            log.warning("step %d skipped: non-finite loss or gradients", record.step)
            if state.bad_in_a_row > train.max_bad_steps:
                first = record.step - state.bad_in_a_row + 1
                raise TrainingAborted(
                    f"{self.spec.section}: {state.bad_in_a_row} steps in a row with a non-finite "
                    f"loss (steps {first}-{record.step}), more than "
                    f"{self.spec.section}.max_bad_steps={train.max_bad_steps}; "
                    f"aborted at step {record.step}. {self._last_good()}"
                )
            return
        state.bad_in_a_row = 0
        if train.spike_factor is None or record.loss is None:
            return
        earlier = [h.loss for h in state.history[:-1] if h.loss is not None]
        if is_loss_spike(earlier, record.loss, train.spike_factor, train.spike_steps):
            state.spike_in_a_row += 1
        else:
            state.spike_in_a_row = 0
        if state.spike_in_a_row >= train.spike_steps:
            raise TrainingAborted(
                f"{self.spec.section}: loss above {train.spike_factor}x its running mean for "
                f"{state.spike_in_a_row} steps (to step {record.step}, loss "
                f"{record.loss:.4f}); aborted. {self._last_good()}"
            )

    def _last_good(self) -> str:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return "No checkpoint was written yet."
        return f"Last good checkpoint: {storage.join(self.checkpoint_root, tag_for(latest))}."

    def _log_step(self, record: StepRecord) -> None:
        from pipeline.train.throughput import mfu, peak_memory_gib

        util = mfu(record.tokens_per_s / self.world, self.flops_per_token, self.config.compute.pool)
        memory = peak_memory_gib(self.device.type)
        loss = "skipped" if record.loss is None else f"{record.loss:.4f}"
        aux = "" if record.aux_loss is None else f" aux_loss {record.aux_loss:.4f}"
        log.info(
            "step %d/%d loss %s%s lr %.3e grad_norm %s tokens/s %.0f target tokens/s %.0f "
            "mfu %s peak memory %.2f GiB skipped steps %d",
            record.step,
            self.train_cfg.max_steps,
            loss,
            aux,
            record.lr,
            "-" if record.grad_norm is None else f"{record.grad_norm:.3f}",
            record.tokens_per_s,
            record.target_tokens_per_s,
            "n/a (cpu)" if util is None else f"{100 * util:.1f}%",
            memory,
            self.state.skipped_steps,
        )
        numeric = {
            k: float(v)
            for k, v in asdict(record).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        numeric |= {"peak_memory_gib": memory, "skipped_steps": float(self.state.skipped_steps)}
        if util is not None:
            numeric["mfu"] = util
        self._log_mlflow(numeric, step=record.step)

    def _log_mlflow(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0 and self.spec.mlflow_run_id:
            from pipeline import tracking

            tracking.log_metrics(self.config.tracking, self.spec.mlflow_run_id, metrics, step=step)

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        step = self.state.step
        self._check_weights_finite(f"checkpoint at step {step}")
        loop_state = {
            "step": step,
            "max_steps": self.train_cfg.max_steps,
            "world_size": self.world,
            "section": self.spec.section,
            "state": asdict(self.state),
            # What a resume may see changed without leaving the trajectory (trajectory.py).
            "operational": trajectory.operational_settings(self.config, self.spec.section),
        }
        waited = self.checkpoints.save(self.engine, step, loop_state, rng_snapshot(), self.faults)
        self.checkpoint_steps.append(step)
        if self.rank == 0:
            log.info("checkpoint step %d written (the loop waited %.2f s)", step, waited)
            self._log_mlflow({"checkpoint_step": float(step), "checkpoint_save_s": waited}, step)

    def _check_weights_finite(self, what: str) -> None:
        """Refuse to persist non-finite weights (ZeRO-3: each rank checks its own partition).
        Counted on the device, read once for all ranks."""
        import torch

        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        # Frozen weights cannot change (and QLoRA's packed 4-bit blocks are not floats).
        for param in self.engine.module.parameters():
            if not param.requires_grad:
                continue
            local = getattr(param, "ds_tensor", param)
            if local.numel():
                bad += (~torch.isfinite(local.detach())).any().to(bad.device, torch.float64)
        if step_totals(bad)[0] > 0:
            raise TrainingAborted(
                f"{self.spec.section}: non-finite weights at step {self.state.step}; "
                f"refusing to write the {what}. {self._last_good()}"
            )

    # -- finish ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for checkpoint uploads, export the model, write the metrics (rank 0)."""
        self.checkpoints.wait()
        self._check_weights_finite("model export")
        if self.train_cfg.method == "full":
            save_model(
                self.engine,
                output_uri=self.spec.output_uri,
                tokenizer_uri=self.spec.tokenizer_uri,
                chat_format=self.config.data.chat_format,
                zero_stage=self.config.compute.zero_stage,
                rank=self.rank,
            )
        else:
            save_adapter_model(
                self.engine,
                output_uri=self.spec.output_uri,
                model_dir=self.model_dir,
                tokenizer_dir=self.tokenizer_dir,
                base_uri=self.spec.model_uri,
                chat_format=self.config.data.chat_format,
                merge=self.train_cfg.adapter.merge,
                zero_stage=self.config.compute.zero_stage,
                rank=self.rank,
            )
        if self._partitioned_loading is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # Unregistered, not left to the garbage collector: a model loaded later in this
            # process (an export, a test's own load) must not be partitioned by it.
            unset_hf_deepspeed_config()
            self._partitioned_loading = None
        if self.rank == 0:
            storage.write_json(
                storage.join(self.spec.output_uri, TRAIN_METRICS_FILE), self._final_metrics()
            )

    def _final_metrics(self) -> dict[str, Any]:
        """Losses over every step of the run (resumed attempts included); speed over the
        applied steps of this attempt, its first (warm-up) step left out."""
        from pipeline.train.throughput import mfu, peak_memory_gib

        metrics = summarize(self.state, self.attempt_records)
        per_device = metrics["tokens_per_s"] / self.world
        return metrics | {
            "mfu": mfu(per_device, self.flops_per_token, self.config.compute.pool),
            "flops_per_token": self.flops_per_token,
            "peak_memory_gib": peak_memory_gib(self.device.type),
            "parameters": self.n_params,
            "trainable_parameters": self.n_trainable,
            "method": self.train_cfg.method,
            "attention": self.attention,
            "cross_entropy": self.cross_entropy,
            "resumed_from_step": self.resumed_from,
            "checkpoint_steps": self.checkpoint_steps,
            "checkpoint_uri": self.checkpoint_root,
            "first_step_reads": self.first_step_reads,
        }


def spec_dict(spec: LoopSpec) -> dict[str, Any]:
    return asdict(spec)
