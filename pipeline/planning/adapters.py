"""What the planner counts for adapter training (LoRA, QLoRA) instead of full weights.

LoRA (Hu et al. 2021) freezes every weight and trains, beside each targeted linear layer
``d_in x d_out``, two matrices ``A: r x d_in`` and ``B: d_out x r``: ``r (d_in + d_out)``
parameters per layer. The targets default to every linear projection of the decoder (Q, K, V,
O, and each expert's gate, up and down; not the router or the LM head), which is what QLoRA
(Dettmers et al. 2023) found necessary to match full fine-tuning.

QLoRA stores those targeted weights in 4-bit NF4 (bitsandbytes ``Linear4bit``): 4 bits per
weight, plus one absmax per block of 64 weights (fp32, 4 bytes; with double quantization an
8-bit absmax and one fp32 constant per 256 of them). Embeddings, norms and the LM head stay
16-bit. Every forward and backward pass dequantizes each 4-bit weight to bf16 before its
matmul: a memory-bound pass over the weights that full and LoRA training do not pay.

The optimizer states, gradients and their collectives are the adapter's alone; the frozen
weights still need their input gradients, so activations are those of full training, and the
backward pass skips only the frozen weights' gradients (2 of the 6 FLOPs per weight and token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import LORA_TARGETS
from pipeline.planning.architecture import Architecture
from pipeline.planning.flops import matmul_params_per_token, model_flops_per_token

Method = Literal["full", "lora", "qlora"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
ALL_LINEAR = tuple(LORA_TARGETS)
"""peft's module names of the decoder's linear projections (Llama, Mistral, Mixtral, Qwen)."""
NF4_BLOCK = 64
"""Weights per quantization block (bitsandbytes' default for NF4)."""
DOUBLE_QUANT_BLOCK = 256
"""Absmax values per second-level block under double quantization."""


@dataclass(frozen=True)
class Adapter:
    """How a section trains: full weights, or a LoRA adapter over frozen 16-bit or 4-bit ones."""

    method: Method = "full"
    rank: int = 16
    targets: tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.05
    """peft applies dropout to each targeted layer's input on the adapter's path: above 0 it
    keeps one more copy of that input per target for backward."""
    double_quant: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(ALL_LINEAR))
        if unknown:
            raise ValueError(f"adapter targets {unknown}: the planner knows {list(ALL_LINEAR)}")
        if self.rank < 1:
            raise ValueError(f"adapter rank {self.rank}: must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"adapter dropout {self.dropout}: must be in [0, 1)")

    @property
    def trains_full_weights(self) -> bool:
        return self.method == "full"


def _target_shapes(arch: Architecture) -> dict[str, tuple[int, int, int]]:
    """Each target's (d_in, d_out, copies per layer): experts multiply the MLP projections."""
    d, q, kv, ff, e = (
        arch.hidden_size,
        arch.q_width,
        arch.kv_width,
        arch.intermediate_size,
        arch.num_experts,
    )
    return {
        "q_proj": (d, q, 1),
        "k_proj": (d, kv, 1),
        "v_proj": (d, kv, 1),
        "o_proj": (q, d, 1),
        "gate_proj": (d, ff, e),
        "up_proj": (d, ff, e),
        "down_proj": (ff, d, e),
    }


def adapter_params(arch: Architecture, adapter: Adapter) -> int:
    """Trainable parameters of the adapter over the whole model (0 for full training)."""
    if adapter.trains_full_weights:
        return 0
    shapes = _target_shapes(arch)
    per_layer = sum(
        adapter.rank * (d_in + d_out) * copies
        for name, (d_in, d_out, copies) in shapes.items()
        if name in adapter.targets
    )
    return arch.num_layers * per_layer


def adapter_matmul_params_per_token(arch: Architecture, adapter: Adapter) -> int:
    """Adapter weights one token goes through: only its top-k experts' adapters."""
    if adapter.trains_full_weights:
        return 0
    shapes = _target_shapes(arch)
    per_layer = 0
    for name, (d_in, d_out, copies) in shapes.items():
        if name in adapter.targets:
            routed = arch.experts_per_token if copies > 1 else 1
            per_layer += adapter.rank * (d_in + d_out) * routed
    return arch.num_layers * per_layer


def targeted_weight_params(arch: Architecture, adapter: Adapter) -> int:
    """Frozen weights of the targeted layers: what QLoRA stores in 4 bits."""
    shapes = _target_shapes(arch)
    per_layer = sum(
        d_in * d_out * copies
        for name, (d_in, d_out, copies) in shapes.items()
        if name in adapter.targets
    )
    return arch.num_layers * per_layer


def nf4_bytes_per_weight(double_quant: bool) -> float:
    """Bytes per 4-bit weight: half a byte plus its share of the block constants."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


def frozen_bytes(arch: Architecture, adapter: Adapter, element_bytes: int) -> float:
    """Bytes of the frozen weights: 16-bit (or fp32) for LoRA; QLoRA's targets in NF4 and the
    rest (embeddings, norms, LM head, router) 16-bit."""
    params = arch.total_params()
    if adapter.method != "qlora":
        return float(element_bytes * params)
    quantized = targeted_weight_params(arch, adapter)
    return quantized * nf4_bytes_per_weight(adapter.double_quant) + element_bytes * (
        params - quantized
    )


def dropout_copy_elements(arch: Architecture, adapter: Adapter) -> int:
    """Elements per token one layer keeps for the adapters' dropout (0 without dropout): the
    dropped-out input of each target, once per routed expert for the MLP projections."""
    if adapter.trains_full_weights or adapter.dropout == 0:
        return 0
    total = 0
    for name, (d_in, _, copies) in _target_shapes(arch).items():
        if name in adapter.targets:
            total += d_in * (arch.experts_per_token if copies > 1 else 1)
    return total


def trained_flops_per_token(arch: Architecture, seq_len: int, adapter: Adapter) -> float:
    """FLOPs per token a training step needs, without recomputation (the MFU numerator).

    Full training: ``flops.model_flops_per_token`` (6 per weight). Adapters: 4 per frozen
    weight (forward and input gradient; no weight gradient), 6 per adapter weight, and the
    attention's forward and backward as in full training.
    """
    full = model_flops_per_token(arch, seq_len)
    if adapter.trains_full_weights:
        return full
    frozen_weight_grads = 2.0 * matmul_params_per_token(arch)
    return full - frozen_weight_grads + 6.0 * adapter_matmul_params_per_token(arch, adapter)
