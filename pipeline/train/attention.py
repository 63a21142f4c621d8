"""Pick the attention kernel at run time and say which one ran.

flash-attn only builds against CUDA, so it is an optional extra of the GPU image; the same code
runs sdpa on CPU workers. Packed blocks stay document-isolated on both: flash-attention takes the
varlen path from the position-id restarts, sdpa/eager get a block-diagonal causal mask built
from them by transformers.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def flash_attention_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(requested: str) -> str:
    """Resolve ``compute.attention`` to the implementation transformers should load.

    Raises:
        ValueError: flash_attention_2 was requested explicitly but cannot run here.
    """
    if requested == "auto":
        chosen = "flash_attention_2" if flash_attention_available() else "sdpa"
    elif requested == "flash_attention_2" and not flash_attention_available():
        raise ValueError(
            "compute.attention=flash_attention_2 needs a CUDA device and the flash-attn package "
            "(pip install '.[gpu]' in the GPU image); use 'auto' or 'sdpa' elsewhere"
        )
    else:
        chosen = requested
    log.info("attention backend: %s (requested %s)", chosen, requested)
    return chosen
