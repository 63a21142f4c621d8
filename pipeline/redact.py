"""Keep secrets out of what the pipeline shows: MLflow params, Airflow XCom and log lines.

Two kinds of secret are recognised: credentials inside a URI (``scheme://user:password@host``,
``?token=...``) and the value of any key whose name says it is secret (``HF_TOKEN``,
``password``, ``aws_secret_access_key``, ``api_key`` ...). A value that only *refers* to a
secret, ``${HF_TOKEN}``, is kept: Ray expands it on the node from that node's environment,
which is where secrets belong.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

REDACTED = "***"

_SECRET_WORDS = {
    "token",
    "password",
    "passwd",
    "pwd",
    "secret",
    "credential",
    "credentials",
    "authorization",
}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")}
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&][^=&#\s]*(token|passw(or)?d|secret|key|signature|credential)[^=&#\s]*=)"
    r"(?P<value>[^&#\s]+)",
    re.IGNORECASE,
)
_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def is_secret_key(name: str) -> bool:
    """True for key names that hold secrets: a word of the name is ``token``, ``password``,
    ``secret``... (``HF_TOKEN``, ``db_password``, ``apiKey``, ``AWS_SECRET_ACCESS_KEY``).

    Whole words only, so ``tokenizer`` and ``max_new_tokens`` stay visible.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    if _SECRET_WORDS.intersection(words) or "apikey" in words:
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def is_reference(value: Any) -> bool:
    """True for ``${NAME}``: a pointer to an environment variable, not the secret itself."""
    return isinstance(value, str) and bool(_REFERENCE.match(value))


def redact_text(text: str) -> str:
    """``https://user:pw@host/x?token=abc`` -> ``https://***@host/x?token=***``.

    Applied to any string: URIs embedded in a log line are redacted where they stand.
    """
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (dicts, lists, strings, scalars) with secrets replaced by ``***``.

    Args:
        value: what is about to be logged, pushed to XCom or sent to MLflow.
        key: the name ``value`` is stored under; a secret-looking name redacts the whole value
            (except a ``${NAME}`` reference and empty values).

    Returns:
        The same structure; non-secret values unchanged.
    """
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    literal = value not in (None, "") and not isinstance(value, bool | int | float)
    if key and is_secret_key(key) and literal and not is_reference(value):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


def literal_secrets(mapping: dict[str, Any], prefix: str) -> list[str]:
    """Dotted names of secret-looking keys in ``mapping`` that hold a literal value (not a
    ``${NAME}`` reference); used to refuse secrets written into a config file."""
    found = []
    for name, value in mapping.items():
        dotted = f"{prefix}.{name}"
        if isinstance(value, dict):
            found += literal_secrets(value, dotted)
        elif is_secret_key(str(name)) and isinstance(value, str) and not is_reference(value):
            found.append(dotted)
    return found
