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
# ``https://${USER}:${TOKEN}@host``: userinfo made of references only (pip expands them on the
# node from its environment), which is what the refusal of a literal credential asks for.
_REFERENCE_USERINFO = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}(:\$\{[A-Za-z_][A-Za-z0-9_]*\})?$")


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
    return _QUERY_SECRET.sub(_query_value, _URI_USERINFO.sub(_userinfo, text))


def uri_credentials(text: str) -> bool:
    """True when ``text`` holds a literal credential in a URI (``user:pw@``, ``?token=...``);
    ``${NAME}`` references in their place are not credentials."""
    return redact_text(text) != text


def _userinfo(match: re.Match[str]) -> str:
    if _REFERENCE_USERINFO.match(match["userinfo"]):
        return match[0]
    return f"{match['scheme']}{REDACTED}@"


def _query_value(match: re.Match[str]) -> str:
    if is_reference(match["value"]):
        return match[0]
    return f"{match['key']}{REDACTED}"


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


def literal_secrets(value: Any, prefix: str) -> list[str]:
    """Dotted names (``a.b``, ``a.pip[0]``) under ``value`` that hold a literal secret: a
    secret-looking key with a value that is not a ``${NAME}`` reference, or a string with
    credentials in a URI; used to refuse secrets written into a config file."""
    if isinstance(value, dict):
        found = []
        for name, item in value.items():
            dotted = f"{prefix}.{name}"
            if is_secret_key(str(name)) and isinstance(item, str) and not is_reference(item):
                found.append(dotted)
            else:
                found += literal_secrets(item, dotted)
        return found
    if isinstance(value, list | tuple):
        return [f for i, item in enumerate(value) for f in literal_secrets(item, f"{prefix}[{i}]")]
    return [prefix] if isinstance(value, str) and uri_credentials(value) else []
