"""Model FLOPs utilisation and peak memory, as the training loop reports them.

MFU = tokens/s per GPU x model FLOPs per token / the GPU's peak dense bf16 rate. Both factors
come from the planner, so the loop's MFU and ``pipeline plan``'s predicted MFU are one
definition: FLOPs per token are ``pipeline.planning.flops.model_flops_per_token``
(``6·N + 6·L·q·S``, N the matmul weights one token goes through: no input embedding, no norms,
top-k of the experts; causal attention; no recomputation), and the peak is
``pipeline.planning.hardware.POOLS``' ``peak_tflops["bf16"]``.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

from pipeline.planning import flops
from pipeline.planning.architecture import from_hf_config
from pipeline.planning.hardware import gpu_peak_flops


def model_flops_per_token(hf_config: Any, seq_len: int) -> float:
    """The MFU numerator per token of a Hugging Face model, as the planner counts it.

    Args:
        hf_config: the model's ``PretrainedConfig`` (``model.config``; e.g. the LlamaConfig or
            MixtralConfig of ``pipeline.train.model.build_llama``/``build_mixtral``).
        seq_len: tokens per packed training block.

    Returns:
        FLOPs per trained token (forward and backward).

    Raises:
        ConfigError: the model type is not one of the Llama-shaped decoders the planner knows
            (``architecture.SUPPORTED_MODEL_TYPES``) or the config lacks a dimension.
    """
    arch = from_hf_config(hf_config.to_dict(), f"{type(hf_config).__name__} of the trained model")
    return flops.model_flops_per_token(arch, seq_len)


def mfu(tokens_per_s_per_device: float, per_token_flops: float, pool: str) -> float | None:
    """Fraction of the pool's peak; None on CPU workers, which have no comparable peak."""
    peak = gpu_peak_flops(pool)
    return None if peak is None else tokens_per_s_per_device * per_token_flops / peak


def peak_memory_gib(device_type: str) -> float:
    """Peak device memory allocated by torch on CUDA; the process's peak RSS on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
