"""Step time and MFU of one setting: hardware FLOPs over the sustained matmul rate, plus the
ZeRO collectives that do not overlap, PCIe traffic and the CPU Adam step when offloading.

MFU = tokens/s per GPU x ``flops.model_flops_per_token`` / peak, the definition the training
loop logs (for adapters, ``adapters.trained_flops_per_token``: no frozen weight gradients).
Hardware FLOPs (what sets the step time) add what the GPU recomputes: the forward pass of
every checkpointed layer, and the LM head matmul under the ``chunked`` loss. QLoRA adds the
dequantization of its 4-bit weights before each pass, memory-bound (``dequantize_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.planning.adapters import (
    adapter_params,
    frozen_bytes,
    nf4_bytes_per_weight,
    targeted_weight_params,
    trained_flops_per_token,
)
from pipeline.planning.flops import layer_forward_flops_per_token, lm_head_forward_flops_per_token
from pipeline.planning.workload import Setting, Workload

KERNEL_EFFICIENCY = {
    "flash_attention_2": 0.55,
    "flex_attention": 0.55,
    "sdpa": 0.405,
    "eager": 0.25,
}
"""Sustained share of the matmul peak, in ``hardware_flops_per_token``, that a model of width
-> infinity reaches with each attention kernel (packed documents). From one H200 run of this
trainer (1.1B Llama, seq 4096, bf16, micro-batch 8): flex 42.5%, sdpa 31.5% of the peak at
width 2048, divided by the width and token factors below; flash is taken as flex, eager keeps
its old ratio to sdpa. The counted attention is causal over the whole block: sdpa and eager
compute the whole masked score matrix and the kernels see packed documents, both of which
land in these shares rather than in the FLOP count."""
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


def hardware_flops_per_token(work: Workload, setting: Setting) -> float:
    """FLOPs the GPU runs per token: model FLOPs + recomputed layer forwards + the chunked
    loss's second LM head forward (liger's fused loss computes its gradients in the one pass)."""
    arch = work.arch
    flops = trained_flops_per_token(arch, work.seq_len, work.adapter)
    checkpointed = setting.checkpointed_layers(arch.num_layers)
    flops += checkpointed * layer_forward_flops_per_token(arch, work.seq_len)
    if work.loss_kernel(setting) == "chunked":
        flops += lm_head_forward_flops_per_token(arch)
    return flops


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


def zero_communication_s(work: Workload, setting: Setting, compute_s: float) -> tuple[float, float]:
    """ZeRO's collectives: (one micro-step with what compute does not hide, once per step).

    Args:
        work: the model and pool.
        setting: its ZeRO stage.
        compute_s: one micro-step's compute.
    """
    n = work.num_workers
    ring = (n - 1) / n / (collective_gbyte_s(work) * 1e9)
    # Seconds of one pass through a ring collective: of what ZeRO-3 gathers (every stored
    # parameter), and of the trained parameters (or their gradients).
    gathered, trained = (b * ring for b in _collective_bytes(work))
    if setting.zero_stage == 3:
        # Parameters gathered for forward and again for backward, gradients reduce-scattered,
        # every micro-step; overlap_comm hides them behind compute when compute is longer.
        return max(compute_s, 2 * gathered + trained), 0.0
    if setting.zero_stage == 2:
        # Gradients reduce-scattered every micro-step (overlap_comm is off in zero.py), the
        # updated 16-bit parameters all-gathered once per step.
        return compute_s + trained, trained
    # ZeRO-0/1 communicate at the step boundary only: ZeRO-0 all-reduces the gradients (a
    # reduce-scatter and an all-gather), ZeRO-1 reduce-scatters them and all-gathers the
    # updated parameters.
    return compute_s, 2 * trained


def _collective_bytes(work: Workload) -> tuple[float, float]:
    """(bytes ZeRO-3 gathers per pass, bytes of the trained parameters): both every 16-bit
    parameter for full training; for adapters the frozen weights as stored (QLoRA's in 4 bits)
    with the adapter's, and the adapter's alone."""
    arch, e = work.arch, work.element_bytes
    if work.adapter.trains_full_weights:
        whole = float(e * arch.total_params())
        return whole, whole
    trained = float(e * adapter_params(arch, work.adapter))
    return frozen_bytes(arch, work.adapter, e) + trained, trained


def optimizer_step_s(work: Workload, setting: Setting, accum: int) -> tuple[float, float]:
    """(PCIe copies and the CPU Adam step when offloading, the GPU Adam step) per step."""
    e, adapter = work.element_bytes, work.adapter
    params = (
        work.arch.total_params()
        if adapter.trains_full_weights
        else adapter_params(work.arch, adapter)
    )
    pcie = work.pool.pcie_gbyte_s * 1e9
    shard = params / work.num_workers if setting.zero_stage > 0 else params
    offload, optimizer = 0.0, 0.0
    if setting.offload_optimizer:
        # Gradients go down when they are reduced (every micro-step under ZeRO-2/3, once under
        # ZeRO-1), updated parameters come up once, CPU Adam runs on the shard.
        downs = accum if setting.zero_stage >= 2 else 1
        offload += (downs + 1) * e * shard / pcie
        offload += shard / (CPU_ADAM_PARAMS_PER_CORE_S * work.cpus_per_worker)
    else:
        optimizer = GPU_ADAM_BYTES_PER_PARAM * shard / (work.pool.hbm_gbyte_s * 1e9)
    if setting.offload_params:
        # Each micro-step fetches the stored parameters' shard twice (forward and backward).
        stored = (
            e * shard
            if adapter.trains_full_weights
            else _collective_bytes(work)[0] / work.num_workers
        )
        offload += accum * 2 * stored / pcie
    return offload, optimizer


def dequantize_s(work: Workload, setting: Setting) -> float:
    """QLoRA: seconds per micro-step to dequantize the 4-bit weights to 16 bits before each
    forward and backward pass (and each recomputed forward), reading NF4 and writing bf16 at
    HBM bandwidth; 0 for full and LoRA training. One pass dequantizes each weight once for the
    whole micro-batch; an MoE micro-batch of thousands of tokens reaches every expert."""
    adapter, arch = work.adapter, work.arch
    if adapter.method != "qlora":
        return 0.0
    passes = 2 + setting.checkpointed_layers(arch.num_layers) / arch.num_layers
    moved = nf4_bytes_per_weight(adapter.double_quant) + work.element_bytes
    return passes * targeted_weight_params(arch, adapter) * moved / (work.pool.hbm_gbyte_s * 1e9)


def estimate_step(work: Workload, setting: Setting) -> StepEstimate:
    """Predicted optimizer-step time of ``setting`` (``blocks_per_worker`` blocks per worker)."""
    n, micro = work.num_workers, setting.micro_batch_size
    accum = work.blocks_per_worker // micro
    flops = hardware_flops_per_token(work, setting) * micro * work.seq_len
    compute = flops / matmul_rate(work, micro) + dequantize_s(work, setting)
    if setting.zero_stage == 3:
        compute *= STAGE3_OVERHEAD
    micro_time, per_step = zero_communication_s(work, setting, compute)
    offload, optimizer = optimizer_step_s(work, setting, accum)
    step = accum * micro_time + per_step + offload + optimizer
    tokens = work.blocks_per_worker * work.seq_len * n
    tokens_per_s = tokens / step
    peak = work.pool.peak_tflops[work.precision] * 1e12
    mfu = tokens_per_s / n * trained_flops_per_token(work.arch, work.seq_len, work.adapter) / peak
    return StepEstimate(
        compute_s=accum * compute,
        communication_s=accum * (micro_time - compute) + per_step,
        offload_s=offload,
        optimizer_s=optimizer,
        step_time_s=step,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
    )
