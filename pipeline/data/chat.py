"""Chat templates rendered as (text, trainable) segments, tokenized with prompt tokens masked.

Tokenizing segment by segment (instead of the whole rendered string) makes the mask exact: no
BPE merge can straddle the boundary between a prompt and an answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ChatFormat = Literal["chatml", "llama3"]


def render_segments(messages: list[dict[str, str]], fmt: ChatFormat) -> list[tuple[str, bool]]:
    """Render a conversation as segments; ``True`` marks text the model is trained to produce.

    Only assistant content and the end-of-turn token that closes it are trainable, so the model
    learns to answer and to stop, never to imitate the user.
    """
    segments: list[tuple[str, bool]] = []
    if fmt == "llama3":
        segments.append(("<|begin_of_text|>", False))
    for message in messages:
        role, content = message["role"], message["content"]
        if fmt == "chatml":
            header, end = f"<|im_start|>{role}\n", "<|im_end|>"
            trailer = "\n"
        else:
            header, end = f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"
            trailer = ""
        trainable = role == "assistant"
        segments.append((header, False))
        segments.append((content + end, trainable))
        if trailer:
            segments.append((trailer, False))
    return segments


def tokenize_chat(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase, fmt: ChatFormat
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; labels are IGNORE_INDEX on prompt tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in render_segments(messages, fmt):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
    return ids, labels


def check_chat_tokens(tok: PreTrainedTokenizerBase, fmt: ChatFormat) -> None:
    """Fail early when the tokenizer lacks the format's turn markers (they would be split)."""
    if fmt == "chatml":
        needed = ["<|im_start|>", "<|im_end|>"]
    else:
        needed = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = tok.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise ValueError(
            f"data.chat_format={fmt!r} needs tokens {missing} that the tokenizer does not have; "
            "choose the chat_format that matches the model's tokenizer"
        )
