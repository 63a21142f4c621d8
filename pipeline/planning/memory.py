"""Peak GPU memory per GPU and host RAM per node of one setting.

Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` with ``zero_init``): 18 bytes per partitioned
parameter in bf16 (16-bit gradients, fp32 master weights, Adam moments and fp32 gradients),
2 bytes per replicated 16-bit parameter under ZeRO-1/2, and 4 bytes per parameter of the largest
module, gathered with its gradient, under ZeRO-3. The fp32 gradient partition lives only during
the optimizer step, so the backward peak (activations alive) and the step peak are separate.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", sbh(34 + 5as/h) per layer) redone for this architecture: RMSNorm instead
of LayerNorm (Hugging Face's saves an fp32 copy of its input), GQA (K and V are kv_heads wide),
SwiGLU (three ff-wide tensors and the product), no dropout. Flash and flex attention keep no
s x s tensor; eager keeps the fp32 softmax (and its 16-bit copy). A checkpointed layer keeps one
tensor (its input) and is recomputed, one at a time, in backward; with
``checkpoint_every_n_layers`` = k only layers 0, k, 2k, ... are checkpointed and the others keep
everything. The loss is counted apart, by the cross-entropy the trainer runs: ``full`` holds
vocab x seq_len x micro-batch fp32 log-probabilities and their gradient; ``chunked`` one chunk
of ``loss_chunk_tokens`` tokens at a time; ``fused`` (liger-kernel) one chunk of about
tokens x hidden / vocab tokens (so its logits are about as big as the hidden states) plus the
input and weight gradients it computes in the forward pass.

Adapters (LoRA, QLoRA; ``pipeline.planning.adapters``) keep optimizer states, gradients and
buckets for the adapter's parameters only, and the frozen weights beside them (16-bit, or
NF4 for QLoRA's targets). Their activations are full training's (the frozen layers still
pass input gradients back) plus, with adapter dropout, one dropped-out copy of each targeted
layer's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.planning.adapters import adapter_params, dropout_copy_elements, frozen_bytes
from pipeline.planning.hardware import GIB
from pipeline.planning.workload import Setting, Workload

# DeepSpeed defaults (the project's zero.py leaves them alone), in elements.
REDUCE_BUCKET = 500_000_000
ALLGATHER_BUCKET = 500_000_000
STAGE3_PREFETCH_BUCKET = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_HOST_BUFFER_FACTOR = 1.5
"""DeepSpeed's ``additional_buffer_factor`` for host memory estimates."""
LOGITS_BYTES_PER_ELEMENT = 8
"""fp32 log-probabilities saved by the loss plus their fp32 gradient at the start of backward
(the 16-bit logits and their fp32 copy are gone by then). Matches the H200 measurements in
tests/unit/test_plan.py to within 6%."""
CHUNK_LOGITS_BYTES_PER_ELEMENT = 12
"""``chunked`` loss, per element of one chunk's logits at its backward peak: fp32 logits, the
fp32 log-probabilities the loss saves and their fp32 gradient (plus the 16-bit logits and
gradient in bf16, ``element_bytes`` more). An estimate from the tensors the chunk makes, not
yet measured on a GPU."""
FRAGMENTATION = 0.10
"""Share of activation and logits memory lost to allocator fragmentation."""
WORKER_PROCESS_GIB = 1.5
"""Host RAM of one training worker process (Python, torch, Ray, CUDA host side)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU and on one host."""

    model_states: float
    """DeepSpeed's model-state figure for one GPU (at the optimizer step)."""
    activations: float
    """Saved activations and backward temporaries at their peak, the loss's logits included."""
    logits: float
    """What the loss holds at its peak (see ``loss_bytes``)."""
    buffers: float
    """Gradient reduce and parameter prefetch buckets."""
    fragmentation: float
    runtime: float
    gpu_peak: float
    """max(backward peak, optimizer-step peak) + fragmentation + runtime reserve; on CPU pools
    the same figure for one worker, held in host RAM."""
    host_offload: float
    """DeepSpeed's host figure per node (offloaded states, pinned buffers, model loading)."""
    host_peak: float
    """Host RAM per node: offload figure + worker processes (+ every worker's memory on CPU)."""

    def gib(self, name: str) -> float:
        return float(getattr(self, name)) / GIB


def state_bytes(work: Workload, setting: Setting) -> tuple[float, float]:
    """Model-state bytes per GPU: (at the optimizer step, during backward).

    Full training: the trainable states of every parameter (``trainable_state_bytes``) and,
    under ZeRO-3, the largest module gathered with its gradient. Adapters: the trainable states
    of the adapter alone, plus the frozen weights (``adapters.frozen_bytes``): replicated under
    ZeRO 0-2, partitioned under ZeRO-3 (QLoRA's 4-bit storage too: the trainer stores it in
    bf16 elements, which ZeRO shards), gathered one module at a time without a gradient.
    """
    arch, e, n = work.arch, work.element_bytes, work.num_workers
    adapter = work.adapter
    if adapter.trains_full_weights:
        gathered = 2 * e * arch.largest_module_params() if setting.zero_stage == 3 else 0.0
        step, backward = trainable_state_bytes(work, setting, arch.total_params())
        return gathered + step, gathered + backward
    frozen = frozen_bytes(arch, adapter, e)
    if setting.zero_stage == 3:
        resident = 0.0 if setting.offload_params else frozen / n
        gathered = e * arch.largest_module_params()
    else:
        resident, gathered = frozen, 0.0
    step, backward = trainable_state_bytes(work, setting, adapter_params(arch, adapter))
    return resident + gathered + step, resident + gathered + backward


def trainable_state_bytes(work: Workload, setting: Setting, params: int) -> tuple[float, float]:
    """Bytes per GPU of ``params`` trained parameters: (at the optimizer step, in backward).

    At the step the figure equals DeepSpeed's estimator; during backward the fp32 gradient
    partition (18 - 16 or 18 - 14 bytes per param in bf16) does not exist yet, except under
    ZeRO-0, whose bf16 optimizer keeps it.
    """
    n = work.num_workers
    e = work.element_bytes
    mixed = work.precision == "bf16"
    partition = 18 if mixed else 12  # grads, master copy, Adam m and v, fp32 grads (bf16)
    if setting.zero_stage == 3:
        if setting.offload_params:
            resident = 0.0
        elif setting.offload_optimizer:
            resident = e * params / n
        else:
            resident = (partition + e) * params / n if not mixed else partition * params / n
        step_only = 2 * params / n if mixed and not setting.offload_optimizer else 0.0
        return resident, resident - step_only
    # ZeRO-0/1 keep whole 16-bit gradients too; ZeRO-0 partitions nothing (one "partition").
    grads_replicated = setting.zero_stage <= 1
    replicated = e * params * (2 if grads_replicated else 1)
    shards = n if setting.zero_stage > 0 else 1
    if setting.offload_optimizer:
        partitioned = 0.0
    else:
        partitioned = (partition - (e if grads_replicated else 0)) * params / shards
    # ZeRO-1/2 build the fp32 gradient partition at the step; ZeRO-0 in bf16 runs DeepSpeed's
    # BF16_Optimizer, which allocates its fp32 gradient accumulators once and keeps them.
    transient = mixed and not setting.offload_optimizer and setting.zero_stage > 0
    step_only = 4 * params / shards if transient else 0.0
    return replicated + partitioned, replicated + partitioned - step_only


def host_state_bytes(work: Workload, setting: Setting) -> float:
    """DeepSpeed's host-memory figure per node (``zero_init`` for ZeRO-3), factor 1.5 included.

    ZeRO-2 with offload: DeepSpeed's estimator charges ``max(4 x total GPUs, 16)`` bytes per
    param to every node; the offloaded state is partitioned over nodes and only the ranks of one
    node load the model there, so this uses ``max(4 x GPUs per node, 16 / nodes)``; the two
    agree on one node. Adapters: see ``adapter_host_bytes``.
    """
    if not work.adapter.trains_full_weights:
        return adapter_host_bytes(work, setting) * DS_HOST_BUFFER_FACTOR
    params = work.arch.total_params()
    nodes = work.pool.num_nodes
    per_node = work.pool.devices_per_node
    if setting.zero_stage == 3:
        if setting.offload_params:
            state = 18 * params / nodes
        elif setting.offload_optimizer:
            state = 16 * params / nodes
        else:
            state = 4 * work.arch.largest_module_params() * per_node
    elif setting.offload_optimizer:
        state = params * max(4 * per_node, 16 / nodes)
    else:
        state = 4 * params * per_node
    return state * DS_HOST_BUFFER_FACTOR


def adapter_host_bytes(work: Workload, setting: Setting) -> float:
    """Host bytes per node of adapter training, before DeepSpeed's buffer factor: loading plus
    what is offloaded.

    Loading: ZeRO-3 partitions while loading (``zero_init``, as for full training); under
    ZeRO 0-2 every rank of the node holds the 16-bit model on the host before moving it to its
    GPU, except QLoRA, which quantizes each weight onto the GPU as it loads (one module on the
    host at a time). Offloaded: the adapter's optimizer states (as DeepSpeed's estimator counts
    them for full training, on the adapter's parameters) and, with ``offload_params``, the
    frozen weights' partition.
    """
    arch, adapter, e = work.arch, work.adapter, work.element_bytes
    nodes, per_node = work.pool.num_nodes, work.pool.devices_per_node
    trained = adapter_params(arch, adapter)
    if setting.zero_stage == 3:
        loading = 4.0 * arch.largest_module_params() * per_node
    elif adapter.method == "qlora":
        loading = float(e * arch.largest_module_params() * per_node)
    else:
        loading = float(e * arch.total_params() * per_node)
    offloaded = 0.0
    if setting.offload_optimizer:
        per_param = 16 / nodes if setting.zero_stage == 3 else max(4 * per_node, 16 / nodes)
        offloaded += trained * per_param
    if setting.offload_params:
        offloaded += frozen_bytes(arch, adapter, e) / nodes
    return loading + offloaded


def layer_activation_bytes(work: Workload, micro: int) -> float:
    """Bytes one decoder layer saves for backward (no checkpointing)."""
    arch, e = work.arch, work.element_bytes
    sb = work.seq_len * micro
    d, q, kv = arch.hidden_size, arch.q_width, arch.kv_width
    k = arch.experts_per_token
    norms = 2 * (4 + 2 * e) * sb * d  # fp32 input copy, normalised x, output: twice per layer
    flash = work.attention in ("flash_attention_2", "flex_attention")
    # sdpa and eager get K and V repeated to every query head, and a contiguous output copy.
    kv_saved = 2 * e * sb * (kv if flash else q)
    attention = e * sb * q + kv_saved + e * sb * q * (1 if flash else 2)
    if work.attention == "eager":
        softmax = (4 + (e if e != 4 else 0)) * micro * arch.num_heads * work.seq_len**2
        attention += softmax
    mlp = k * 4 * e * sb * arch.intermediate_size  # gate, SiLU(gate), up, product
    if arch.num_experts > 1:
        mlp += k * 2 * e * sb * d  # tokens gathered per expert, weighted outputs
    # The adapters' dropped-out inputs and their boolean masks (none without dropout).
    dropout = (e + 1) * sb * dropout_copy_elements(arch, work.adapter)
    return norms + attention + mlp + dropout


def loss_bytes(work: Workload, setting: Setting) -> float:
    """Bytes the cross-entropy holds at its peak for one micro-batch, by the kernel the trainer
    runs under ``setting`` (``Workload.loss_kernel``)."""
    arch, e = work.arch, work.element_bytes
    vocab, d = arch.vocab_size, arch.hidden_size
    tokens = work.seq_len * setting.micro_batch_size
    kernel = work.loss_kernel(setting)
    if kernel == "full":
        return LOGITS_BYTES_PER_ELEMENT * vocab * tokens
    if kernel == "chunked":
        per_element = CHUNK_LOGITS_BYTES_PER_ELEMENT + (e if e < 4 else 0)
        return per_element * vocab * min(work.loss_chunk_tokens, tokens)
    # liger's fused linear cross-entropy: chunks of next_power_of_2(tokens / ceil(V / d))
    # tokens, whose 16-bit logits are overwritten by their gradient; the input and LM-head
    # weight gradients are computed in the forward pass and held until backward.
    chunk = min(1 << (math.ceil(tokens / math.ceil(vocab / d)) - 1).bit_length(), tokens)
    return e * vocab * chunk + e * tokens * d + e * vocab * d


def activation_bytes(work: Workload, setting: Setting) -> tuple[float, float]:
    """(peak activation bytes incl. the loss's, the loss's bytes) for one micro-batch."""
    arch, e, b = work.arch, work.element_bytes, setting.micro_batch_size
    sb = work.seq_len * b
    layer = layer_activation_bytes(work, b)
    final_norm = (4 + 2 * e) * sb * arch.hidden_size
    logits = loss_bytes(work, setting)
    temporaries = (
        e * sb * (2 * arch.hidden_size + 2 * arch.experts_per_token * arch.intermediate_size)
    )
    checkpointed = setting.checkpointed_layers(arch.num_layers)
    kept = checkpointed * e * sb * arch.hidden_size + (arch.num_layers - checkpointed) * layer
    # The loss peaks at the end of the forward pass; a recomputed layer later, in backward.
    backward = layer + temporaries if checkpointed else temporaries
    return kept + final_norm + max(logits, backward), logits


def buffer_bytes(work: Workload, setting: Setting) -> tuple[float, float]:
    """(backward buffers, extra at the optimizer step): DeepSpeed's bucket allocations."""
    params = work.arch.total_params()
    e = work.element_bytes
    # Buckets hold trained parameters (or their gradients): the adapter's alone when it trains.
    trained = (
        params if work.adapter.trains_full_weights else adapter_params(work.arch, work.adapter)
    )
    reduce = e * min(REDUCE_BUCKET, trained)
    if setting.zero_stage == 3:
        # The gathered layer being computed and the prefetched next one, up to max_live.
        gathered = e * min(STAGE3_MAX_LIVE_PARAMETERS, 2 * work.arch.layer_params())
        return reduce + e * min(STAGE3_PREFETCH_BUCKET, params) + gathered, 0.0
    if setting.zero_stage == 0:
        return 0.0, 0.0
    return reduce, e * min(ALLGATHER_BUCKET, trained)


def loading_bytes(work: Workload, setting: Setting) -> float:
    """Bytes on one GPU while the model loads, when that is more than training holds: QLoRA
    under ZeRO-3 quantizes the whole model onto every GPU before ZeRO partitions it
    (bitsandbytes' weights are not created under ``zero.Init``: deepspeedai/DeepSpeed#5660).
    0 otherwise: full and LoRA weights are partitioned as they load."""
    if work.adapter.method != "qlora" or setting.zero_stage != 3:
        return 0.0
    return frozen_bytes(work.arch, work.adapter, work.element_bytes)


def estimate_memory(work: Workload, setting: Setting) -> MemoryEstimate:
    """Peak memory of one GPU and one host for ``setting``."""
    states_step, states_backward = state_bytes(work, setting)
    activations, logits = activation_bytes(work, setting)
    buffers, step_buffers = buffer_bytes(work, setting)
    fragmentation = FRAGMENTATION * activations
    runtime = work.pool.runtime_reserved_gib * GIB
    peak = max(
        states_backward + activations + buffers,
        states_step + buffers + step_buffers,
        loading_bytes(work, setting),
    )
    gpu_peak = peak + fragmentation + runtime
    host_offload = host_state_bytes(work, setting)
    workers_here = work.pool.devices_per_node
    host_peak = host_offload + workers_here * WORKER_PROCESS_GIB * GIB
    if not work.pool.has_gpu:
        host_peak += workers_here * gpu_peak
    return MemoryEstimate(
        model_states=states_step,
        activations=activations,
        logits=logits,
        buffers=buffers,
        fragmentation=fragmentation,
        runtime=runtime,
        gpu_peak=gpu_peak,
        host_offload=host_offload,
        host_peak=host_peak,
    )
