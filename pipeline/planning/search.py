"""Every candidate setting for a config, the fastest that fits, and why each other lost."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, config_from_dict
from pipeline.planning.adapters import Adapter, adapter_params
from pipeline.planning.architecture import architecture_for
from pipeline.planning.flops import matmul_params_per_token, model_flops_per_token
from pipeline.planning.hardware import GIB, pool_for
from pipeline.planning.memory import MemoryEstimate, estimate_memory
from pipeline.planning.throughput import StepEstimate, estimate_step
from pipeline.planning.workload import Setting, Workload

GPU_SAFETY = 0.05
"""Share of GPU memory a plan leaves free beyond the predicted peak, which already carries a
fragmentation margin and the CUDA/NCCL reserve (spikes the model misses)."""
HOST_SAFETY = 0.20
"""Share of host RAM a plan leaves free (Ray's object store, page cache, the OS)."""
MAX_MICRO_BATCH = 64
OFFLOAD_MARGIN = 0.05
"""A setting that offloads is chosen only when predicted more than this much faster than the
fastest fitting one that does not: the step model's error against the H200 runs (up to 3.5%),
and offload's costs it leaves out (host memory bandwidth and cores shared with data loading,
pinned host memory)."""


@dataclass(frozen=True)
class Prediction:
    """One setting's predicted memory and speed, and whether it fits."""

    setting: Setting
    memory: MemoryEstimate
    step: StepEstimate
    short: tuple[str, ...]
    """Resources it runs out of: ``gpu_memory``, ``host_memory`` (empty: it fits)."""
    loss_kernel: str
    """The cross-entropy the trainer runs under this setting (``Workload.loss_kernel``)."""
    why: str = ""

    @property
    def fits(self) -> bool:
        return not self.short

    def to_dict(self, has_gpu: bool = True) -> dict[str, Any]:
        """The JSON form; ``gpu_memory_gib`` is 0 on CPU pools (everything is host memory)."""
        s, m, t = self.setting, self.memory, self.step
        return {
            "zero_stage": s.zero_stage,
            "offload_optimizer": s.offload_optimizer,
            "offload_params": s.offload_params,
            "activation_checkpointing": s.activation_checkpointing,
            "checkpoint_every_n_layers": s.checkpoint_every_n_layers,
            "micro_batch_size": s.micro_batch_size,
            "cross_entropy": self.loss_kernel,
            "gpu_memory_gib": round(m.gib("gpu_peak"), 2) if has_gpu else 0.0,
            "host_memory_gib": round(m.gib("host_peak"), 2),
            "model_states_gib": round(m.gib("model_states"), 2),
            "activations_gib": round(m.gib("activations"), 2),
            "logits_gib": round(m.gib("logits"), 2),
            "fits": self.fits,
            "short": list(self.short),
            "step_time_s": round(t.step_time_s, 4),
            "tokens_per_s": round(t.tokens_per_s, 1),
            "mfu": round(t.mfu, 4),
            "why": self.why,
        }


@dataclass(frozen=True)
class Plan:
    """The plan for one training section of a config."""

    section: str
    work: Workload
    configured: Prediction
    candidates: list[Prediction] = field(default_factory=list)
    chosen: Prediction | None = None

    def to_dict(self) -> dict[str, Any]:
        pool, arch = self.work.pool, self.work.arch
        adapter = self.work.adapter
        return {
            "section": self.section,
            "method": adapter.method,
            "adapter": None
            if adapter.trains_full_weights
            else {
                "rank": adapter.rank,
                "targets": list(adapter.targets),
                "dropout": adapter.dropout,
                "double_quant": adapter.double_quant,
                "trainable_params": adapter_params(arch, adapter),
            },
            "model": {
                "name": arch.name,
                "params": arch.total_params(),
                "active_params": arch.active_params(),
                "matmul_params_per_token": matmul_params_per_token(arch),
                "model_flops_per_token": model_flops_per_token(arch, self.work.seq_len),
                "seq_len": self.work.seq_len,
                "precision": self.work.precision,
                "attention": self.work.attention,
            },
            "pool": {
                "name": pool.name,
                "nodes": pool.num_nodes,
                "devices_per_node": pool.devices_per_node,
                "workers": self.work.num_workers,
                "gpu_memory_gib": pool.device_memory_gib,
                "host_memory_gib": round(pool.host_memory_gib, 1),
            },
            "configured": self.configured.to_dict(pool.has_gpu),
            "candidates": [c.to_dict(pool.has_gpu) for c in self.candidates],
            "chosen": self.chosen.to_dict(pool.has_gpu) if self.chosen else None,
        }


def adapter_for(config: PipelineConfig, section: str) -> Adapter:
    """What ``section`` trains, as its ``method`` and ``adapter`` settings say.

    Raises:
        ConfigError: a target module the planner does not know how to size.
    """
    train = config.cpt if section == "cpt" else config.sft
    try:
        return Adapter(
            method=train.method,
            rank=train.adapter.rank,
            targets=tuple(train.adapter.target_modules),
            dropout=train.adapter.dropout,
            double_quant=train.adapter.double_quant,
        )
    except ValueError as err:
        raise ConfigError(f"{section}.adapter: {err}") from err


def workload_for(config: PipelineConfig, section: str, adapter: Adapter | None = None) -> Workload:
    """The fixed part of the plan: model, pool, sequence length, kernel, batch per worker, and
    what trains (``adapter``; the section's method and adapter settings when None).

    Raises:
        ConfigError: the architecture cannot be read (see ``architecture_for``), or
            ``section`` is not ``cpt``/``sft``.
    """
    if section not in ("cpt", "sft"):
        raise ConfigError(f"plan section {section!r}: expected 'cpt' or 'sft'")
    compute = config.compute
    train = config.cpt if section == "cpt" else config.sft
    pool = pool_for(compute)
    attention = compute.attention
    if attention == "auto":  # what select_attention picks: flash-attn ships in the GPU image
        attention = "flash_attention_2" if pool.has_gpu else "sdpa"
    return Workload(
        arch=architecture_for(config.model),
        pool=pool,
        num_workers=compute.num_workers,
        cpus_per_worker=compute.cpus_per_worker,
        seq_len=config.data.seq_len,
        precision=compute.precision,
        attention=attention,
        blocks_per_worker=train.micro_batch_size * train.grad_accum_steps,
        cross_entropy=compute.cross_entropy,
        loss_chunk_tokens=compute.loss_chunk_tokens,
        adapter=adapter or adapter_for(config, section),
    )


def predict(work: Workload, setting: Setting) -> Prediction:
    """Memory, speed and fit of one setting."""
    memory = estimate_memory(work, setting)
    short = []
    usable_gpu = work.pool.device_memory_gib * (1 - GPU_SAFETY) * GIB
    if work.pool.has_gpu and memory.gpu_peak > usable_gpu:
        short.append("gpu_memory")
    if memory.host_peak > work.pool.host_memory_gib * (1 - HOST_SAFETY) * GIB:
        short.append("host_memory")
    step = estimate_step(work, setting)
    return Prediction(setting, memory, step, tuple(short), work.loss_kernel(setting))


CHECKPOINT_EVERY = (1, 2, 4)
"""``checkpoint_every_n_layers`` values the planner tries with checkpointing on."""


def candidate_settings(work: Workload) -> list[Setting]:
    """ZeRO 0-3 x optimizer offload (ZeRO 1-3) x parameter offload (ZeRO-3) x checkpointing
    (off, or every 1st, 2nd or 4th layer) x micro-batch sizes that divide the section's blocks
    per worker (its global batch stays the same). ZeRO-3 is left out when the loss is
    ``fused``, which cannot run on ZeRO-3's partitioned LM head, and ZeRO-0 in bf16, which
    DeepSpeed can only run with bf16 gradients (config validation refuses both). QLoRA runs
    without parameter offload: ZeRO-Infinity moves 16-bit partitions to the host, not
    bitsandbytes' packed 4-bit weights and their quantization state.
    """
    micros = [
        m
        for m in range(1, min(work.blocks_per_worker, MAX_MICRO_BATCH) + 1)
        if work.blocks_per_worker % m == 0
    ]
    offloads = {
        0: [(False, False)],
        1: [(False, False), (True, False)],
        2: [(False, False), (True, False)],
        3: [(False, False), (True, False), (True, True)],
    }
    if work.adapter.method == "qlora":
        offloads[3] = [(False, False), (True, False)]
    stages = [0, 1, 2] if work.cross_entropy == "fused" else [0, 1, 2, 3]
    if work.precision == "bf16":
        stages.remove(0)
    layers = work.arch.num_layers
    # Keep one k per distinct number of checkpointed layers (on 2 layers, k = 2 and 4 agree).
    every = {-(-layers // k): k for k in reversed(CHECKPOINT_EVERY)}
    checkpointing = [(False, 1)] + [(True, k) for k in sorted(every.values())]
    return [
        Setting(stage, opt, params, ckpt, micro, every_n)
        for stage in stages
        for opt, params in offloads[stage]
        for ckpt, every_n in checkpointing
        for micro in micros
    ]


def configured_setting(config: PipelineConfig, section: str) -> Setting:
    compute = config.compute
    train = config.cpt if section == "cpt" else config.sft
    return Setting(
        zero_stage=compute.zero_stage,
        offload_optimizer=compute.offload_optimizer,
        offload_params=compute.offload_params,
        activation_checkpointing=compute.activation_checkpointing,
        micro_batch_size=train.micro_batch_size,
        checkpoint_every_n_layers=compute.checkpoint_every_n_layers,
    )


def explain(prediction: Prediction, chosen: Prediction | None, work: Workload) -> str:
    """Why a candidate is (not) the plan, in one line."""
    if prediction.short:
        return short_reason(prediction, work)
    if chosen is None or prediction.setting == chosen.setting:
        if chosen is not None and _offloads(chosen):
            return "chosen: fastest that fits; none without offload comes within the margin"
        return "chosen: highest predicted throughput that fits"
    slower = prediction.step.step_time_s / chosen.step.step_time_s - 1
    if slower < -0.005:
        return (
            f"{-slower:.0%} faster, but it offloads and the margin to offloading is "
            f"{OFFLOAD_MARGIN:.0%}"
        )
    if slower > 0.005:
        return f"{slower:.0%} slower ({prediction.step.step_time_s:.3g} s vs {chosen.step.step_time_s:.3g} s per step)"
    if _rank(prediction)[1] > _rank(chosen)[1]:
        return "as fast, but needs more memory than the chosen plan"
    return "as fast and as big: the plan takes the lower ZeRO stage, less offload"


def short_reason(prediction: Prediction, work: Workload) -> str:
    """Which resource is short and by how much."""
    parts = []
    m = prediction.memory
    if "gpu_memory" in prediction.short:
        usable = work.pool.device_memory_gib * (1 - GPU_SAFETY)
        parts.append(
            f"GPU memory short: needs {m.gib('gpu_peak'):.1f} GiB per GPU, "
            f"{usable:.1f} of {work.pool.device_memory_gib:g} GiB usable"
        )
    if "host_memory" in prediction.short:
        usable = work.pool.host_memory_gib * (1 - HOST_SAFETY)
        parts.append(
            f"host memory short: needs {m.gib('host_peak'):.1f} GiB per node, "
            f"{usable:.1f} of {work.pool.host_memory_gib:.0f} GiB usable"
        )
    return "; ".join(parts)


def _rank(p: Prediction) -> tuple[float, float, int, int]:
    """Fastest, then least memory, then (on one GPU ZeRO-1 and ZeRO-2 tie) the simpler setting."""
    s = p.setting
    memory = p.memory.gpu_peak + p.memory.host_peak / 1e3
    return (p.step.step_time_s, memory, s.zero_stage, s.offload_optimizer + s.offload_params)


def _offloads(p: Prediction) -> bool:
    return p.setting.offload_optimizer or p.setting.offload_params


def choose(fitting: list[Prediction]) -> Prediction | None:
    """The fastest fitting prediction, unless it offloads and one that does not is within
    ``OFFLOAD_MARGIN`` of it; None when nothing fits."""
    if not fitting:
        return None
    fastest = min(fitting, key=_rank)
    on_gpu = [p for p in fitting if not _offloads(p)]
    if _offloads(fastest) and on_gpu:
        best_on_gpu = min(on_gpu, key=_rank)
        if best_on_gpu.step.step_time_s <= fastest.step.step_time_s * (1 + OFFLOAD_MARGIN):
            return best_on_gpu
    return fastest


def make_plan(config: PipelineConfig, section: str = "cpt", adapter: Adapter | None = None) -> Plan:
    """Predict the configured setting and every candidate; choose the fastest that fits
    (``choose``). Candidates are listed chosen first, then fitting, fastest first.

    Args:
        config: the run's config.
        section: ``cpt`` or ``sft``.
        adapter: plan this adapter instead of the section's configured method (None: the
            config's).

    Raises:
        ConfigError: the architecture cannot be read.
    """
    work = workload_for(config, section, adapter)
    predictions = [predict(work, s) for s in candidate_settings(work)]
    chosen = choose([p for p in predictions if p.fits])
    first = chosen.setting if chosen else None
    ordered = sorted(predictions, key=lambda p: (p.setting != first, not p.fits, *_rank(p)))
    candidates = [_with_why(p, chosen, work) for p in ordered]
    configured = _with_why(predict(work, configured_setting(config, section)), chosen, work)
    chosen = next((c for c in candidates if chosen and c.setting == chosen.setting), None)
    return Plan(section, work, configured, candidates, chosen)


def _with_why(p: Prediction, chosen: Prediction | None, work: Workload) -> Prediction:
    return Prediction(p.setting, p.memory, p.step, p.short, p.loss_kernel, explain(p, chosen, work))


def apply_plan(config: PipelineConfig) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config with the chosen plan applied, and the plan as a JSON-able dict.

    The compute settings are chosen on ``cpt`` (the long stage); ``sft`` keeps them and takes
    its fastest fitting micro-batch. Each section keeps its blocks per worker per step.

    Raises:
        ConfigError: no candidate fits; the message names the short resource.
    """
    plans = {section: make_plan(config, section) for section in ("cpt", "sft")}
    cpt = plans["cpt"].chosen
    if cpt is None:
        least = min(plans["cpt"].candidates, key=lambda p: p.memory.gpu_peak)
        raise ConfigError(
            f"compute.plan=auto: no setting fits {config.compute.num_workers} x "
            f"{config.compute.pool} workers; the smallest needs: {least.why}. Add workers "
            f"(compute.num_workers), shorten data.seq_len or pick a bigger pool"
        )
    # sft runs on cpt's DeepSpeed settings; only its micro-batch is its own.
    same = [
        p
        for p in plans["sft"].candidates
        if p.fits
        and replace(p.setting, micro_batch_size=1) == replace(cpt.setting, micro_batch_size=1)
    ]
    sft = choose(same) or plans["sft"].configured
    raw = config.model_dump(mode="json")
    raw["compute"] |= {
        "zero_stage": cpt.setting.zero_stage,
        "offload_optimizer": cpt.setting.offload_optimizer,
        "offload_params": cpt.setting.offload_params,
        "activation_checkpointing": cpt.setting.activation_checkpointing,
        "checkpoint_every_n_layers": cpt.setting.checkpoint_every_n_layers,
    }
    for section, chosen in (("cpt", cpt), ("sft", sft)):
        blocks = plans[section].work.blocks_per_worker
        raw[section] |= {
            "micro_batch_size": chosen.setting.micro_batch_size,
            "grad_accum_steps": blocks // chosen.setting.micro_batch_size,
        }
    document = {section: plan.to_dict() for section, plan in plans.items()}
    document["sft"]["chosen"] = sft.to_dict(plans["sft"].work.pool.has_gpu)
    return config_from_dict(raw, "compute.plan=auto"), document


def predicted_step(config: PipelineConfig, section: str) -> dict[str, float]:
    """What the planner predicts for the configured setting of ``section`` (``cpt``/``sft``),
    for the training stage to log beside the peak memory and step time it measures.

    Returns:
        ``predicted_gpu_memory_gib`` (0 on CPU pools), ``predicted_host_memory_gib`` (per node),
        ``predicted_step_time_s``, ``predicted_tokens_per_s``, ``predicted_mfu``.

    Raises:
        ConfigError: the architecture cannot be read (see ``architecture_for``).
    """
    work = workload_for(config, section)
    p = predict(work, configured_setting(config, section))
    return {
        "predicted_gpu_memory_gib": p.memory.gib("gpu_peak") if work.pool.has_gpu else 0.0,
        "predicted_host_memory_gib": p.memory.gib("host_peak"),
        "predicted_step_time_s": p.step.step_time_s,
        "predicted_tokens_per_s": p.step.tokens_per_s,
        "predicted_mfu": p.step.mfu,
    }
