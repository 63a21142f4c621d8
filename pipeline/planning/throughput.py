"""Step time and MFU of one setting: FLOPs over the sustained matmul rate, plus the ZeRO
collectives that do not overlap, PCIe traffic and the CPU Adam step when offloading.

MFU uses the project's definition: tokens/s x (6 N + 12 L d S) / peak, N the parameters one
token goes through. Hardware FLOPs add a forward recompute (x 4/3) under checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.planning.workload import Setting, Workload

KERNEL_EFFICIENCY = {
    "flash_attention_2": 0.64,
    "flex_attention": 0.64,
    "sdpa": 0.48,
    "eager": 0.30,
}
"""Sustained share of the matmul peak a model of width -> infinity reaches with each attention
kernel (packed documents). From one H200 run of this trainer (1.1B Llama, seq 4096, bf16):
flex 49.5%, sdpa 37.5% of hardware FLOPs at width 2048, divided by the width factor below."""
WIDTH_HALF = 512
"""Width at which matmuls reach half their sustained rate: efficiency x d / (d + 512)."""
TOKENS_HALF = 1024
"""Tokens per micro-batch at which kernels reach half their sustained rate."""
STAGE3_OVERHEAD = 1.035
"""ZeRO-3 per-module fetch/release hooks: 3.5% slower than ZeRO-2 on one H200."""
COLLECTIVE_EFFICIENCY = 0.8
"""Share of link bandwidth NCCL ring collectives reach."""
CPU_ADAM_PARAMS_PER_CORE_S = 9e7
"""DeepSpeed CPU Adam updates per second per core; one H200 host's ZeRO-3 offload run lost
0.95 s per step of 1.1B parameters against the same run without offload (16 cores)."""
GPU_ADAM_BYTES_PER_PARAM = 36
"""Bytes the fused GPU Adam step reads and writes per parameter of the partition."""


@dataclass(frozen=True)
class StepEstimate:
    """Seconds per optimizer step and what they are made of."""

    compute_s: float
    communication_s: float
    """ZeRO collectives left after overlap with compute."""
    offload_s: float
    """PCIe copies and the CPU Adam step."""
    optimizer_s: float
    step_time_s: float
    tokens_per_s: float
    """Whole run (every worker)."""
    mfu: float


def model_flops_per_token(work: Workload) -> float:
    """6 N + 12 L d S: the MFU numerator per token."""
    arch = work.arch
    return 6 * arch.active_params() + 12 * arch.num_layers * arch.hidden_size * work.seq_len


def matmul_rate(work: Workload, micro: int) -> float:
    """Sustained FLOP/s of one device for this model width, kernel and micro-batch."""
    peak = work.pool.peak_tflops[work.precision] * 1e12
    kernel = KERNEL_EFFICIENCY[work.attention]
    d = work.arch.hidden_size
    tokens = micro * work.seq_len
    return peak * kernel * d / (d + WIDTH_HALF) * tokens / (tokens + TOKENS_HALF)


def collective_gbyte_s(work: Workload) -> float:
    """Per-device bandwidth of a ring over all workers: the slowest link it crosses."""
    pool = work.pool
    link = pool.intra_node_gbyte_s if pool.num_nodes == 1 else pool.inter_node_gbyte_s_per_device()
    return link * COLLECTIVE_EFFICIENCY


def estimate_step(work: Workload, setting: Setting) -> StepEstimate:
    """Predicted optimizer-step time of ``setting`` (``blocks_per_worker`` blocks per worker)."""
    arch, n, e = work.arch, work.num_workers, work.element_bytes
    micro = setting.micro_batch_size
    accum = work.blocks_per_worker // micro
    tokens_micro = micro * work.seq_len
    flops = model_flops_per_token(work) * tokens_micro
    if setting.activation_checkpointing:
        flops *= 4 / 3
    compute = flops / matmul_rate(work, micro)
    if setting.zero_stage == 3:
        compute *= STAGE3_OVERHEAD
    params = arch.total_params()
    ring = (n - 1) / n
    bandwidth = collective_gbyte_s(work) * 1e9
    if setting.zero_stage == 3:
        # Parameters gathered for forward and again for backward, gradients reduce-scattered,
        # every micro-step; overlap_comm hides them behind compute when compute is longer.
        per_micro = 3 * e * params * ring / bandwidth
        micro_time = max(compute, per_micro)
        communication = accum * (micro_time - compute)
    else:
        # ZeRO-1/2 reduce gradients every micro-step (overlap_comm is off in zero.py) and
        # gather the updated 16-bit parameters once per step.
        per_micro = e * params * ring / bandwidth if n > 1 else 0.0
        micro_time = compute + per_micro
        communication = accum * per_micro + (e * params * ring / bandwidth if n > 1 else 0.0)
    pcie = work.pool.pcie_gbyte_s * 1e9
    shard = params / n
    offload = 0.0
    if setting.offload_optimizer:
        # Gradients down every micro-step, updated parameters up once, CPU Adam on the shard.
        offload += accum * e * shard / pcie + e * shard / pcie
        offload += shard / (CPU_ADAM_PARAMS_PER_CORE_S * work.cpus_per_worker)
        optimizer = 0.0
    else:
        optimizer = GPU_ADAM_BYTES_PER_PARAM * shard / (work.pool.hbm_gbyte_s * 1e9)
    if setting.offload_params:
        offload += accum * 2 * e * shard / pcie  # each micro-step fetches the shard twice
    step = accum * micro_time + offload + optimizer
    if setting.zero_stage != 3:
        step += communication - accum * per_micro  # the once-per-step gather
    tokens = work.blocks_per_worker * work.seq_len * n
    tokens_per_s = tokens / step
    peak = work.pool.peak_tflops[work.precision] * 1e12
    mfu = tokens_per_s / n * model_flops_per_token(work) / peak
    return StepEstimate(
        compute_s=accum * compute,
        communication_s=communication,
        offload_s=offload,
        optimizer_s=optimizer,
        step_time_s=step,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
    )
