"""Build or load the causal LM the trainer works on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def build_llama(
    cfg: ModelConfig, tok: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> PreTrainedModel:
    """A freshly initialised Llama-architecture model sized by ``cfg`` (fp32, on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(seq_len, 2048),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        # Training and scoring never decode step by step, and a KV cache makes transformers skip
        # the packed-sequence detection that keeps packed documents from attending to each other.
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_causal_lm(path: str | Path, attention: str, dtype: torch.dtype) -> PreTrainedModel:
    """Load a Hugging Face-format model folder with the chosen attention kernel.

    Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive first, so the weights are
    partitioned while loading instead of materialised whole on every rank.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation=attention, dtype=dtype
    )
    # See build_llama: with a cache, packed documents would attend across their boundaries.
    model.config.use_cache = False
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the full model, also when ZeRO-3 has partitioned them (``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
