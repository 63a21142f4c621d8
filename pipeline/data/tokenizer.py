"""Tokenizers: load the model's own, or train a byte-level BPE on the domain corpus.

The training tokenizer always carries the chat format's special tokens (added to a base
tokenizer that lacks them, so SFT never splits a turn marker into pieces) and the chat template
training renders with, so the exported model formats a conversation the way it was trained.
Nothing is downloaded from a model hub: a base model's tokenizer comes from its folder.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data import chat
from pipeline.models import fetch_tokenizer_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.config import PipelineConfig

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
    if _generic_class(Path(path)):
        # What AutoTokenizer would load, without importing torch (seconds in every data
        # worker): AutoTokenizer's module pulls in the model configs, this class does not.
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _generic_class(folder: Path) -> bool:
    """The folder names the generic fast tokenizer class (as every tokenizer this project
    trains does), so AutoTokenizer would load exactly that class."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
    return (folder / "tokenizer.json").is_file() and config.get("tokenizer_class") in generic


def training_tokenizer(
    config: PipelineConfig, scratch: str | Path, corpus: Iterable[str] = ()
) -> PreTrainedTokenizerBase:
    """The tokenizer every stage trains with, ready to save next to the data.

    Loads ``model.tokenizer`` (else the base model's tokenizer; only its tokenizer files are
    fetched, never the weights), or trains a byte-level BPE on ``corpus`` when there is no base
    model. Adds the chat format's special tokens the tokenizer lacks (the training loop grows the
    model's embeddings to ``len(tokenizer)``) and attaches the chat template training uses.

    Args:
        config: the resolved pipeline config (``model`` and ``data.chat_format`` are read).
        scratch: a folder for remote tokenizer files; must outlive the returned tokenizer's use
            only until it is saved.
        corpus: training documents, used only when a tokenizer is trained.

    Raises:
        ValueError: a tokenizer must be trained but ``corpus`` is empty, or
            ``chat_format: tokenizer`` and the tokenizer has no chat template.
        FileNotFoundError: the configured folder holds no tokenizer files.
    """
    source = config.model.tokenizer or config.model.base
    if source:
        tok = load_tokenizer(fetch_tokenizer_files(source, config.tracking, Path(scratch)))
    else:
        texts = iter(corpus)
        first = next(texts, None)
        if first is None:
            raise ValueError("no model.tokenizer or model.base: a corpus is needed to train one")
        tok = train_bpe_tokenizer(itertools.chain([first], texts), config.model.vocab_size)
    added = add_chat_tokens(tok, config.data.chat_format)
    if added:
        log.info("added chat tokens %s to the tokenizer of %s (%d tokens)", added, source, len(tok))
    attach_chat_template(tok, config.data.chat_format)
    return tok


def add_chat_tokens(tok: PreTrainedTokenizerBase, fmt: chat.ChatFormat) -> list[str]:
    """Add the chat format's special tokens the tokenizer lacks; returns the ones added."""
    vocab = tok.get_vocab()
    missing = [t for t in chat.format_tokens(fmt) if t not in vocab]
    if missing:
        tok.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return missing


def attach_chat_template(tok: PreTrainedTokenizerBase, fmt: chat.ChatFormat) -> None:
    """Set the template ``fmt`` renders with as ``tok.chat_template`` (kept as is for
    ``tokenizer``, which must have one).

    Raises:
        ValueError: ``fmt`` is ``tokenizer`` and the tokenizer has no template.
    """
    if fmt == "tokenizer":
        chat.check_chat_tokens(tok, fmt)
        return
    tok.chat_template = chat.chat_template(fmt)
