"""Chat templates rendered as (text, trainable) segments, tokenized with prompt tokens masked.

Training and serving render a conversation the same way: the built-in formats (``chatml``,
``llama3``) are described once by ``_FORMATS``, which gives both ``render_segments`` (training)
and the Jinja ``chat_template`` the exported tokenizer carries (``apply_chat_template`` at
serving time). With ``chat_format: tokenizer`` the tokenizer's own template renders both.

A conversation is tokenized as one string, exactly as ``apply_chat_template`` would, so a
SentencePiece tokenizer sees the same word boundaries in training as in serving; a token belongs
to the segment it starts in (found from byte lengths for a byte-level tokenizer, from character
offsets otherwise). Only the template's own markers become special tokens: a ``<|im_start|>``
typed inside a message's content is encoded as plain text (special tokens split), so raw data
cannot fake a turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class ContentNotVerbatim(ValueError):
    """A message's content holds a special-token string, and the chat template does not render
    that content verbatim, so it cannot be encoded as plain text apart from the markers."""


ChatFormat = Literal["chatml", "llama3", "tokenizer"]
BuiltinFormat = Literal["chatml", "llama3"]


@dataclass(frozen=True)
class _Turns:
    """The text around each turn of a built-in chat format."""

    start: str
    """Once, before the first turn."""
    header: str
    """Opens a turn; ``{role}`` is replaced by the message's role."""
    end: str
    """Closes the content; trained after an answer, so the model learns to stop."""
    trailer: str
    """After the end token; never trained."""
    tokens: tuple[str, ...]
    """Special tokens the format needs as single ids."""


_FORMATS: dict[str, _Turns] = {
    "chatml": _Turns(
        start="",
        header="<|im_start|>{role}\n",
        end="<|im_end|>",
        trailer="\n",
        tokens=("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": _Turns(
        start="<|begin_of_text|>",
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        end="<|eot_id|>",
        trailer="",
        tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}


def format_tokens(fmt: ChatFormat) -> list[str]:
    """Special tokens a built-in format needs (none for ``tokenizer``: its template decides)."""
    return list(_FORMATS[fmt].tokens) if fmt in _FORMATS else []


def end_of_turn_token(fmt: ChatFormat) -> str | None:
    """The token that ends an assistant turn (generation stops there), if the format has one."""
    return _FORMATS[fmt].end if fmt in _FORMATS else None


def render_segments(messages: list[dict[str, str]], fmt: ChatFormat) -> list[tuple[str, bool]]:
    """Render a conversation in a built-in format; ``True`` marks text the model is trained to
    produce.

    Only assistant content and the end-of-turn token that closes it are trainable, so the model
    learns to answer and to stop, never to imitate the user.

    Raises:
        ValueError: ``fmt`` is ``tokenizer`` (use ``conversation_segments``).
    """
    if fmt not in _FORMATS:
        raise ValueError(f"chat format {fmt!r} needs the tokenizer; use conversation_segments")
    turns = _FORMATS[fmt]
    segments: list[tuple[str, bool]] = []
    if turns.start:
        segments.append((turns.start, False))
    for message in messages:
        role, content = message["role"], message["content"]
        segments.append((turns.header.format(role=role), False))
        segments.append((content + turns.end, role == "assistant"))
        if turns.trailer:
            segments.append((turns.trailer, False))
    return segments


def chat_template(fmt: BuiltinFormat) -> str:
    """The Jinja ``chat_template`` that renders exactly what ``render_segments`` renders.

    Assistant turns are wrapped in ``{% generation %}`` so ``apply_chat_template`` can return
    the same assistant mask training used (``return_assistant_tokens_mask=True``).
    """
    turns = _FORMATS[fmt]
    before, after = turns.header.split("{role}")
    q = json.dumps  # a JSON string literal is a valid Jinja string literal
    content = f"{{{{ message['content'] + {q(turns.end)} }}}}"
    return (
        (f"{{{{ {q(turns.start)} }}}}" if turns.start else "")
        + "{% for message in messages %}"
        + f"{{{{ {q(before)} + message['role'] + {q(after)} }}}}"
        + "{% if message['role'] == 'assistant' %}{% generation %}"
        + content
        + "{% endgeneration %}{% else %}"
        + content
        + "{% endif %}"
        + (f"{{{{ {q(turns.trailer)} }}}}" if turns.trailer else "")
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{{{{ {q(before + 'assistant' + after)} }}}}"
        + "{% endif %}"
    )


def template_segments(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase
) -> list[tuple[str, bool]]:
    """Segments rendered by the tokenizer's own ``chat_template`` (``chat_format: tokenizer``).

    Each answer is the text the template adds between the conversation up to it (with the
    generation prompt) and the conversation including it; whitespace after the answer's end is
    not trained.

    Raises:
        ValueError: the tokenizer has no template, or its template does not render a
            conversation as a prefix of its continuation (the answers cannot be located).
    """
    check_chat_tokens(tok, "tokenizer")

    def render(upto: int, prompt: bool) -> str:
        text = tok.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=prompt
        )
        assert isinstance(text, str)
        return text

    def after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ValueError(
                "data.chat_format='tokenizer': the tokenizer's chat_template does not render a "
                "conversation as a prefix of its continuation, so answers cannot be masked; "
                "use chat_format 'chatml' instead"
            )
        return text[len(prefix) :]

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(i, True)
        answer = after(prompt, render(i + 1, False))
        trained = answer.rstrip()
        segments += [(after(done, prompt), False), (trained, True), (answer[len(trained) :], False)]
        done = prompt + answer
    segments.append((after(done, render(len(messages), False)), False))
    return [(text, trainable) for text, trainable in segments if text]


def conversation_segments(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase, fmt: ChatFormat
) -> list[tuple[str, bool]]:
    """Segments of one conversation in ``fmt`` (see ``render_segments``, ``template_segments``)."""
    if fmt == "tokenizer":
        return template_segments(messages, tok)
    return render_segments(messages, fmt)


@dataclass(frozen=True)
class RenderedChat:
    """One conversation rendered as text, with what encoding it needs (``render_chat``)."""

    text: str
    nbytes: int
    """UTF-8 bytes of ``text``."""
    trainable: list[tuple[int, int]]
    """Character spans of the trainable segments."""
    trainable_bytes: list[tuple[int, int]]
    """The same spans in UTF-8 bytes."""
    protected: list[tuple[int, int]]
    """Character spans of contents holding a special-token string (none: the usual case)."""


def render_chat(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase, fmt: ChatFormat
) -> RenderedChat:
    """Render one conversation for ``encode_chats``.

    Raises:
        ContentNotVerbatim: a message's content holds a special-token string and the template
            does not render that content verbatim (it cannot be told apart from the markers).
        ValueError: ``chat_format: tokenizer`` and the template cannot be used (see
            ``template_segments``).
    """
    segments = conversation_segments(messages, tok, fmt)
    chars: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []
    start = byte = 0
    for text, trainable in segments:
        size = len(text.encode())
        if trainable:
            chars.append((start, start + len(text)))
            spans.append((byte, byte + size))
        start += len(text)
        byte += size
    rendered = "".join(text for text, _ in segments)
    protected = _content_spans(messages, rendered, _special_strings(tok))
    return RenderedChat(rendered, byte, chars, spans, protected)


def encode_chats(
    chats: list[RenderedChat], tok: PreTrainedTokenizerBase
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and labels (int64; IGNORE_INDEX on prompt tokens) of rendered conversations.

    The ids are those of ``tok.apply_chat_template(messages)``; a token is trained when it
    starts inside a trainable segment. A byte-level tokenizer (Llama 3, GPT-2 style) encodes
    the whole batch in one call without offsets: its tokens spell the text byte for byte, so
    each token's start is the running sum of the bytes of the tokens before it (offsets would
    cost half the encoding again). Other tokenizers, and any encoding whose bytes do not add up
    to its text, take character offsets.
    """
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(chats)
    widths = _token_bytes(tok, len(tok))
    plain = [i for i, c in enumerate(chats) if not c.protected]
    if widths is not None and plain:
        # The template's markers are control tokens.
        encodings = encode_batch(tok, [chats[i].text for i in plain], split_special_tokens=False)
        for i, encoding in zip(plain, encodings, strict=True):
            ids = np.array(encoding.ids, dtype=np.int64)
            ends = np.cumsum(widths[ids])
            if (ends[-1] if len(ends) else 0) == chats[i].nbytes:
                results[i] = ids, _labels(ids, ends - widths[ids], chats[i].trainable_bytes)
    for i, rendered in enumerate(chats):
        if results[i] is None:
            ids_list, offsets = _encode(tok, rendered.text, [])
            if rendered.protected:
                # Keep the template's markers, split every special-token string inside content.
                markers = _markers(tok, ids_list, offsets, rendered.protected)
                ids_list, offsets = _encode(tok, rendered.text, markers)
            ids = np.array(ids_list, dtype=np.int64)
            begins = np.fromiter((b for b, _ in offsets), dtype=np.int64, count=len(offsets))
            results[i] = ids, _labels(ids, begins, rendered.trainable)
    return [r for r in results if r is not None]


def encode_batch(
    tok: PreTrainedTokenizerBase, texts: list[str], split_special_tokens: bool
) -> list[Any]:
    """The backend's ``encode_batch_fast`` (no offsets, no BOS/EOS), special-token strings in
    ``texts`` split into text or not. The flag is the backend's state, and a call as
    ``tok(..., split_special_tokens=True)`` leaves it set: it is set here for this call and put
    back as it was."""
    backend = tok.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = split_special_tokens
    try:
        return list(backend.encode_batch_fast(texts, add_special_tokens=False))
    finally:
        backend.encode_special_tokens = before


def tokenize_chat(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase, fmt: ChatFormat
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation (``render_chat``, then ``encode_chats``)."""
    ids, labels = encode_chats([render_chat(messages, tok, fmt)], tok)[0]
    return ids.tolist(), labels.tolist()


def _labels(ids: np.ndarray, begins: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """``ids`` where a token begins inside one of ``spans`` (sorted, disjoint; in the unit of
    ``begins``), else IGNORE_INDEX: one sorted search for all tokens."""
    spans = [(lo, hi) for lo, hi in spans if hi > lo]
    if not spans:
        return np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    starts, ends = np.array(spans, dtype=np.int64).T
    span = np.searchsorted(starts, begins, side="right") - 1
    inside = (span >= 0) & (begins < ends[np.maximum(span, 0)])
    return np.where(inside, ids, IGNORE_INDEX)


@lru_cache(maxsize=4)
def _token_bytes(tok: PreTrainedTokenizerBase, size: int) -> np.ndarray | None:
    """UTF-8 bytes each of the ``size`` token ids spells, when every encoding spells its text
    byte for byte: a byte-level BPE (each character of a token is one byte) with no normalizer,
    no prefix space and no added token that swallows whitespace. None otherwise."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec.get("normalizer") is not None or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    pre = spec.get("pre_tokenizer") or {}
    if any(p.get("add_prefix_space") for p in pre.get("pretokenizers", [pre])):
        return None
    added = tok.added_tokens_decoder
    if any(t.lstrip or t.rstrip for t in added.values()):
        return None
    widths = np.array([len(p) for p in tok.convert_ids_to_tokens(list(range(size)))])
    for i, token in added.items():
        if i < size:
            widths[i] = len(token.content.encode())
    return widths.astype(np.int64)


def _special_strings(tok: PreTrainedTokenizerBase) -> list[str]:
    return [t.content for t in tok.added_tokens_decoder.values() if t.special]


def _content_spans(
    messages: list[dict[str, str]], rendered: str, specials: list[str]
) -> list[tuple[int, int]]:
    """Character spans of the contents holding a special-token string (none: the usual case)."""
    found, cursor = [], 0
    for i, message in enumerate(messages):
        content = message["content"]
        at = rendered.find(content, cursor)
        if at >= 0:
            cursor = at + len(content)
        if not any(s in content for s in specials):
            continue
        if at < 0:
            raise ContentNotVerbatim(
                f"message {i} holds a special-token string and the chat template does not "
                "render its content verbatim, so it cannot be encoded as plain text"
            )
        found.append((at, at + len(content)))
    return found


def _markers(
    tok: PreTrainedTokenizerBase,
    ids: list[int],
    offsets: list[tuple[int, int]],
    content: list[tuple[int, int]],
) -> list[tuple[int, int, int]]:
    """``(start, end, id)`` of the special tokens the template put outside ``content``."""
    special = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if t.special
    }
    return [
        (begin, end, token)
        for token, (begin, end) in zip(ids, offsets, strict=True)
        if token in special and not any(lo <= begin < hi for lo, hi in content)
    ]


def _encode(
    tok: PreTrainedTokenizerBase, text: str, markers: list[tuple[int, int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text``. Without ``markers``, one call as serving makes;
    with them, each marker is its special id and the text between markers is encoded with
    special tokens split."""
    if not markers:
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    done = 0
    for begin, end, token in [*markers, (len(text), len(text), -1)]:
        if begin > done:
            run = tok(
                text[done:begin],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            ids += run["input_ids"]
            offsets += [(done + lo, done + hi) for lo, hi in run["offset_mapping"]]
        if token >= 0:
            ids.append(token)
            offsets.append((begin, end))
        done = end
    return ids, offsets


def check_chat_tokens(tok: PreTrainedTokenizerBase, fmt: ChatFormat) -> None:
    """Fail early when the tokenizer lacks the format's turn markers (they would be split), or,
    for ``tokenizer``, has no ``chat_template``."""
    if fmt == "tokenizer":
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                "data.chat_format='tokenizer' needs a tokenizer with a chat_template; this one "
                "has none: choose chat_format 'chatml' (its tokens are added when missing)"
            )
        return
    vocab = tok.get_vocab()
    missing = [t for t in format_tokens(fmt) if t not in vocab]
    if missing:
        raise ValueError(
            f"data.chat_format={fmt!r} needs tokens {missing} that the tokenizer does not have; "
            "choose the chat_format that matches the model's tokenizer"
        )
