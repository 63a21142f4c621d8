"""Bits-per-byte of one model on fixed held-out documents, each scored from its start.

Every model reads the same texts (``fixed_sample``) and tokenizes them with its own tokenizer;
a document's bytes are its UTF-8 length, so models with different tokenizers are compared over
exactly the same bytes (token-weighted: total nats / ln 2 / total bytes).

A document is scored after a one-token prefix: the tokenizer's BOS, or, for a tokenizer without
one, its EOS, the separator training packs documents after. So the first real token is scored
too, and the text's every byte is accounted for; the EOS after a document is not scored (it
stands for no byte of the text). A document longer than ``data.seq_len`` tokens is scored in
windows (the Hugging Face perplexity-with-stride method): the first window covers its start, each
next one ends ``stride`` tokens further and holds ``seq_len`` tokens, and only its new tokens are
scored, so every token is scored exactly once, with at least ``seq_len - stride`` tokens of
context. Held-out answers (``score_answers``) go through the same windows with prompt tokens
masked, as in training.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.data import chat

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")
ScoredSequence = tuple[list[int], list[bool]]
"""Token ids and, per position, whether that token is scored (predicted from the ones before)."""


def fixed_sample(items: Sequence[T], limit: int, key: Callable[[T], str] | None = None) -> list[T]:
    """At most ``limit`` items, in the order of the SHA-256 of their text (``key``, default: the
    item itself): the same sample and order for every model and every run, whatever order the
    items came in."""

    def digest(item: T) -> str:
        text = key(item) if key is not None else str(item)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    return sorted(items, key=digest)[:limit]


def chat_key(messages: list[dict[str, str]]) -> str:
    """The text a held-out chat is sampled by (``fixed_sample(chats, n, chat_key)``)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` windows over a sequence of ``length`` tokens.

    Positions ``first_target .. end-1`` are scored in window ``[begin, end)``; position 0 has
    nothing before it and is never scored. Every later window holds ``seq_len`` tokens and
    advances by ``stride`` (at most ``seq_len - 1``, so each target keeps some context).
    """
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len}: scoring needs windows of at least 2 tokens")
    end = min(seq_len, length)
    out = [(0, end, 1)] if end > 1 else []
    step = max(1, min(stride, seq_len - 1))
    while end < length:
        new_end = min(end + step, length)
        out.append((new_end - seq_len, new_end, end))
        end = new_end
    return out


def score_sequences(
    model: PreTrainedModel,
    sequences: Sequence[ScoredSequence],
    seq_len: int,
    stride: int,
    batch_size: int,
    attention: str,
    pad_id: int,
) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) and scored-token count of each sequence.

    Windows of all sequences are batched, longest first (less padding), one window per row,
    right-padded; the padding is a segment of its own (``packed_model_inputs``), so every
    attention kernel sees the same isolated rows training does.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.train.attention import packed_model_inputs

    work = [
        (i, begin, end, first)
        for i, (ids, scored) in enumerate(sequences)
        for begin, end, first in windows(len(ids), seq_len, stride)
        if any(scored[first:end])  # e.g. a window of a long chat's prompt only
    ]
    work.sort(key=lambda w: w[2] - w[1], reverse=True)
    nll, tokens = [0.0] * len(sequences), [0] * len(sequences)
    device = input_device(model)
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        width = max(end - begin for _, begin, end, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, begin, end, _) in enumerate(batch):
            n = end - begin
            ids[row, :n] = torch.tensor(sequences[i][0][begin:end])
            positions[row, :n] = torch.arange(n)
            positions[row, n:] = torch.arange(width - n)
        with torch.no_grad():
            inputs = packed_model_inputs(ids.to(device), positions.to(device), attention)
            # flash_attention_2 and document_sdpa return one flattened row: back to [B, S, V].
            logits = model(**inputs).logits.reshape(len(batch), width, -1)
            for row, (i, begin, end, first) in enumerate(batch):
                seq_ids, scored = sequences[i]
                keep = torch.tensor(scored[first:end], device=logits.device)
                target = torch.tensor(seq_ids[first:end], device=logits.device)
                # Logits at position p predict the token at p + 1.
                predicted = logits[row, first - 1 - begin : end - 1 - begin].float()
                losses = F.cross_entropy(predicted, target, reduction="none")
                nll[i] += float(losses[keep].sum())
                tokens[i] += int(keep.sum())
    return list(zip(nll, tokens, strict=True))


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the model takes its inputs: the device of its input embeddings (a model sharded
    with ``device_map="auto"`` spans several devices)."""
    import torch

    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


def document_prefix(tok: PreTrainedTokenizerBase) -> int:
    """The token a document is scored after: BOS, else EOS (see the module docstring).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for token_id in (tok.bos_token_id, tok.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        "the model's tokenizer has neither a BOS nor an EOS token, so a document's first token "
        "cannot be scored; set bos_token or eos_token in its tokenizer_config.json"
    )


def score_documents(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    texts: Sequence[str],
    seq_len: int,
    window_stride: float,
    batch_size: int,
    attention: str,
) -> list[dict[str, Any]]:
    """``{"nll", "tokens", "bytes"}`` of each text, scored from its start (module docstring).

    Args:
        model: a causal LM in eval mode, loaded with ``attention``.
        tok: the model's own tokenizer.
        texts: the documents (usually a ``fixed_sample``).
        seq_len: window length in tokens (``data.seq_len``).
        window_stride: the fraction of ``seq_len`` a window advances (``eval.window_stride``).
        batch_size: windows per forward pass (``eval.batch_size``).
        attention: the kernel the model was loaded with.
    """
    if not texts:
        return []
    prefix = document_prefix(tok)
    # Special-token strings inside a document stay text, as prepare_data encoded them.
    encoded = tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    sequences = [([prefix, *ids], [False] + [True] * len(ids)) for ids in encoded]
    scored = score_sequences(
        model, sequences, seq_len, _stride(window_stride, seq_len), batch_size, attention,
        _pad_id(tok),
    )  # fmt: skip
    return [
        {"nll": nll, "tokens": tokens, "bytes": len(text.encode("utf-8"))}
        for (nll, tokens), text in zip(scored, texts, strict=True)
    ]


def score_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    chat_format: chat.ChatFormat,
    seq_len: int,
    window_stride: float,
    batch_size: int,
    attention: str,
) -> list[dict[str, Any]]:
    """``{"nll", "tokens", "bytes"}`` of each chat's answers, teacher-forced.

    Tokens are those training learns (assistant content and the end-of-turn token that closes
    it, ``chat.tokenize_chat``); bytes are the UTF-8 bytes of the assistant messages' content.
    A chat longer than ``seq_len`` is scored in windows like a document.
    """
    sequences: list[ScoredSequence] = []
    for messages in chats:
        ids, labels = chat.tokenize_chat(messages, tok, chat_format)
        sequences.append((ids, [label != chat.IGNORE_INDEX for label in labels]))
    scored = score_sequences(
        model, sequences, seq_len, _stride(window_stride, seq_len), batch_size, attention,
        _pad_id(tok),
    )  # fmt: skip
    return [
        {
            "nll": nll,
            "tokens": tokens,
            "bytes": sum(
                len(m["content"].encode("utf-8")) for m in messages if m["role"] == "assistant"
            ),
        }
        for (nll, tokens), messages in zip(scored, chats, strict=True)
    ]


def corpus_scores(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted totals over per-document scores (the contract's ``domain`` shape):
    ``documents`` as given, ``bits_per_byte``, ``loss`` (nats per token), ``perplexity``,
    ``tokens``, ``bytes``."""
    nll = sum(d["nll"] for d in documents)
    tokens = sum(d["tokens"] for d in documents)
    nbytes = sum(d["bytes"] for d in documents)
    loss = nll / max(tokens, 1)
    return {
        "documents": documents,
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "bytes": nbytes,
    }


def _stride(window_stride: float, seq_len: int) -> int:
    return max(1, round(window_stride * seq_len))


def _pad_id(tok: PreTrainedTokenizerBase) -> int:
    # Padding is never scored or attended to; any valid id does.
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad) if pad is not None else 0
