"""Turn raw records into documents and chats, or into a reason they cannot be used.

Nothing here raises on bad content: a record that cannot be used becomes a ``Rejection`` with a
reason code (counted in the manifest) and a detail for the quarantine file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import RecordFields
from pipeline.data.clean import clean_text
from pipeline.data.sources import DataError

__all__ = ["ROLES", "DataError", "Rejection", "chat_messages", "document_text"]

ROLES = ("system", "user", "assistant")
# JSON's \ud83d escapes decode to lone surrogates, which no UTF-8 tokenizer can take.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Rejection:
    reason: str
    """``not_an_object``, ``missing_field``, ``wrong_type``, ``invalid_unicode``,
    ``unknown_role``, ``no_assistant_turn``, ``empty_assistant`` or
    ``final_turn_not_assistant``."""
    detail: str


def _lone_surrogate(text: str, where: str) -> Rejection | None:
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return Rejection(
        "invalid_unicode",
        f"{where} holds a lone UTF-16 surrogate {found.group()!a} at character "
        f"{found.start()} (a broken \\u escape); it is not text",
    )


def document_text(value: Any, fields: RecordFields) -> str | Rejection:
    """The cleaned text of a document record (a plain-text file's value is the text itself).

    Returns:
        The text, or a ``Rejection`` saying why the record is unusable.
    """
    if isinstance(value, str):
        return _lone_surrogate(value, "the text") or clean_text(value)
    if not isinstance(value, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    if fields.text not in value:
        return Rejection("missing_field", f"expected a string field {fields.text!r}")
    text = value[fields.text]
    if not isinstance(text, str):
        return Rejection(
            "wrong_type", f"field {fields.text!r} must be a string, got {type(text).__name__}"
        )
    return _lone_surrogate(text, f"field {fields.text!r}") or clean_text(text)


def chat_messages(value: Any, fields: RecordFields) -> list[dict[str, str]] | Rejection:
    """The cleaned turns of a chat record (``messages`` or a prompt/response pair)."""
    if not isinstance(value, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    if fields.messages in value:
        raw = value[fields.messages]
        if not isinstance(raw, list) or not raw:
            return Rejection("wrong_type", f"expected a non-empty list field {fields.messages!r}")
    elif fields.prompt in value and fields.response in value:
        raw = [
            {fields.role: "user", fields.content: value[fields.prompt]},
            {fields.role: "assistant", fields.content: value[fields.response]},
        ]
    else:
        return Rejection(
            "missing_field",
            f"expected a list field {fields.messages!r}, or fields {fields.prompt!r} and "
            f"{fields.response!r}",
        )
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            return Rejection("wrong_type", f"{fields.messages}[{i}] is not an object")
        role, content = turn.get(fields.role), turn.get(fields.content)
        if role not in ROLES:
            return Rejection(
                "unknown_role",
                f"{fields.messages}[{i}].{fields.role} is {role!r}; expected one of {ROLES}",
            )
        if not isinstance(content, str):
            return Rejection(
                "wrong_type", f"{fields.messages}[{i}].{fields.content} must be a string"
            )
        bad_text = _lone_surrogate(content, f"{fields.messages}[{i}].{fields.content}")
        if bad_text:
            return bad_text
        messages.append({"role": role, "content": clean_text(content)})
    return _check_turns(messages, fields)


def _check_turns(
    messages: list[dict[str, str]], fields: RecordFields
) -> list[dict[str, str]] | Rejection:
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        return Rejection("no_assistant_turn", "no assistant turn, so nothing to learn from")
    empty = [i for i in answers if not messages[i]["content"].strip()]
    if empty:
        return Rejection(
            "empty_assistant", f"{fields.messages}[{empty[0]}] is an assistant turn with no text"
        )
    if messages[-1]["role"] != "assistant":
        return Rejection(
            "final_turn_not_assistant",
            f"the last turn is the {messages[-1]['role']}'s; a chat must end with the answer",
        )
    return messages


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_key(text: str) -> int:
    """First 32 bits of the content hash, which decide the held-out split."""
    return int(content_hash(text)[:8], 16)


def is_heldout(split_keys: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each record (by its ``split_key``) is held out: a stable split by content hash,
    so appending fresh data never moves old records across it."""
    return np.asarray(split_keys, dtype=np.float64) / 0xFFFFFFFF < fraction
