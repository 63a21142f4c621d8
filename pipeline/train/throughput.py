"""Model FLOPs utilisation and peak memory, as the training loop reports them.

MFU = tokens/s per GPU × FLOPs per token / the GPU's peak dense bf16 rate, with

    FLOPs per token = 6·N + 12·L·d·S

(N parameters, L layers, d hidden size, S sequence length: the forward and backward matmuls of
the weights plus the attention scores, as in the PaLM paper's appendix B). Activation
recomputation is not counted: MFU measures useful work. Document masking makes the real
attention work smaller than ``12·L·d·S``; the formula keeps it so that figures compare with
published ones.
"""

from __future__ import annotations

import resource
import sys

PEAK_BF16_FLOPS = {"a100": 312e12, "h100": 989e12}
"""Dense bf16 tensor-core peak per GPU of each pool (NVIDIA datasheets; H200 equals H100)."""


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s_per_device: float, per_token_flops: float, pool: str) -> float | None:
    """Fraction of the pool's peak; None on CPU workers, which have no comparable peak."""
    peak = PEAK_BF16_FLOPS.get(pool)
    return None if peak is None else tokens_per_s_per_device * per_token_flops / peak


def peak_memory_gib(device_type: str) -> float:
    """Peak device memory allocated by torch on CUDA; the process's peak RSS on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
