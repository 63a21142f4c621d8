"""Tiny stand-ins for the preset model families, built locally (nothing is downloaded).

- ``llama2_style_tokenizer``: what Llama 2 and Mixtral ship: SentencePiece-style BPE with byte
  fallback (``<0x00>``..``<0xFF>``), ``<unk>``/``<s>``/``</s>``, a ``▁`` prepended to every piece
  of text, ``<s>`` added in front, no pad token, no ChatML tokens and no chat template.
- ``save_base_model``: a Hugging Face folder holding a tiny Llama or Mixtral and that tokenizer,
  like ``s3://models/meta-llama/Llama-2-70b-hf`` minus 70B parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def tiny_model_config(architecture: Literal["llama", "mixtral"]) -> ModelConfig:
    """Two layers of width 32; the Mixtral has 4 experts, 2 per token."""
    return ModelConfig(
        name=f"tiny-{architecture}",
        architecture=architecture,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        experts_per_token=2,
    )


def llama2_style_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Train a Llama 2-style tokenizer on ``texts`` (ids 0-2 specials, 3-258 bytes, then merges)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    # Learn merges within words only (SentencePiece never merges across a space).
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=SPECIALS, show_progress=False
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {p: i for i, p in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    # Llama 2's tokenizer.json: no pre-tokenizer, "▁" prepended and spaces replaced.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_base_model(
    out: Path,
    architecture: Literal["llama", "mixtral"],
    tok: PreTrainedTokenizerFast,
    seq_len: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny base model of ``architecture`` with ``tok`` to ``out``; returns ``out``."""
    from pipeline.train.model import build_model

    model = build_model(tiny_model_config(architecture), tok, seq_len, seed)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
