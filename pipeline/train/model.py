"""Build or load the causal LM the trainer works on (``pipeline.models`` fetches it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def _decoder_fields(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seq_len: int) -> dict[str, Any]:
    """The Hugging Face config fields every decoder built from ``cfg`` shares."""
    return {
        "vocab_size": len(tok),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": max(seq_len, 2048),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
        # Training and scoring never decode step by step, and a KV cache makes transformers skip
        # the packed-sequence detection that keeps packed documents from attending to each other.
        "use_cache": False,
    }


def build_llama(
    cfg: ModelConfig, tok: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> PreTrainedModel:
    """A freshly initialised Llama-architecture model sized by ``cfg`` (fp32, on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_decoder_fields(cfg, tok, seq_len))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_causal_lm(
    path: str | Path, attention: str, dtype: torch.dtype, quantization: Any | None = None
) -> PreTrainedModel:
    """Load a Hugging Face-format model folder with the chosen attention kernel, its linear
    layers quantized when ``quantization`` (a ``BitsAndBytesConfig``) is given.

    Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive first, so the weights are
    partitioned while loading instead of materialised whole on every rank.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation=attention, dtype=dtype, quantization_config=quantization
    )
    # See _decoder_fields: with a cache, packed documents would attend across boundaries.
    model.config.use_cache = False
    return model


def build_mixtral(
    cfg: ModelConfig, tok: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> PreTrainedModel:
    """A freshly initialised sparse mixture-of-experts Mixtral sized by ``cfg`` (fp32, on CPU)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        **_decoder_fields(cfg, tok, seq_len),
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def build_model(
    cfg: ModelConfig, tok: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> PreTrainedModel:
    """A freshly initialised model of ``cfg.architecture`` (``model.base: null``)."""
    if cfg.architecture == "mixtral":
        return build_mixtral(cfg, tok, seq_len, seed)
    return build_llama(cfg, tok, seq_len, seed)


def load_training_model(
    model_dir: Path,
    tokenizer_dir: Path,
    attention: str,
    dtype: torch.dtype,
    quantization: Any | None = None,
) -> tuple[PreTrainedModel, int]:
    """Load a model folder for training with the tokenizer prepare_data wrote; returns the
    model and the vocabulary size it had in its folder.

    The KV cache is off (see ``load_causal_lm``). When the tokenizer has more tokens than the
    model (chat tokens added to a base tokenizer) the embeddings and LM head grow to
    ``len(tokenizer)``; new rows start near the mean of the old ones. Under ZeRO-3 the caller
    keeps an ``HfDeepSpeedConfig`` alive, so loading and resizing work on partitioned weights;
    ``zero.partition_loaded_model`` then handles what was created whole.
    """
    from pipeline.data.tokenizer import load_tokenizer

    model = load_causal_lm(model_dir, attention, dtype, quantization)
    tok = load_tokenizer(tokenizer_dir)
    vocab = int(model.config.get_text_config().vocab_size)
    if len(tok) > vocab:
        log.info("growing the embeddings from %d to %d tokens", vocab, len(tok))
        model.resize_token_embeddings(len(tok))
    return model, vocab


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the full model, also when ZeRO-3 has partitioned them (``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
