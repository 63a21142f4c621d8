"""Tokenizers: load the model's own, or train a byte-level BPE on the domain corpus.

A trained tokenizer carries the chat special tokens, so SFT never splits a turn marker into
pieces. Nothing is downloaded: a base model's tokenizer comes from its folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer (GPT-2/Llama 3 style pre-tokenization)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *CHATML_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    log.info("trained byte-level BPE tokenizer with %d tokens", tok.get_vocab_size())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHATML_TOKENS,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder; a missing pad token falls back to EOS (Llama has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def token_byte_lengths(tok: PreTrainedTokenizerBase) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens).

    Bits-per-byte divides the loss by these, which makes models with different tokenizers
    comparable (a candidate against the current champion). Counted from the token's own bytes,
    not by decoding it alone: a token holding part of a multi-byte character decodes to U+FFFD.
    """
    from tokenizers import decoders, pre_tokenizers

    special = set(tok.all_special_ids)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    if isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel):
        # Each character of a byte-level token stands for exactly one byte.
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        return [0 if i in special else sum(c in alphabet for c in p) for i, p in enumerate(pieces)]
    # SentencePiece-style (Llama 2, Mistral): "▁" is a space, <0xNN> is one raw byte.
    lengths = []
    for i, piece in enumerate(pieces):
        if i in special:
            lengths.append(0)
        elif _BYTE_FALLBACK.match(piece):
            lengths.append(1)
        else:
            lengths.append(len(piece.replace("▁", " ").encode()))
    return lengths
