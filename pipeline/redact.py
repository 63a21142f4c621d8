"""Keep secrets out of what the pipeline shows: MLflow params, Airflow XCom and log lines.

Three kinds of secret are recognised: credentials inside a URI (``scheme://user:password@host``,
``?token=...``, ``?sig=...``), credentials in the forms log lines carry them
(``Authorization: Bearer ...``, ``export AWS_SECRET_ACCESS_KEY=...``, ``"password": "..."``),
and the value of any key whose name says it is secret (``HF_TOKEN``, ``password``, ``DB_PASS``,
``GITHUB_PAT``, ``signing_key`` ...), whatever that value is (a dict under ``credentials`` is
hidden whole). A value that only *refers* to a secret, ``${HF_TOKEN}``, is kept: Ray expands it
on the node from that node's environment, which is where secrets belong.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

REDACTED = "***"

_SECRET_WORDS = {
    "token",
    "password",
    "passwords",
    "passwd",
    "pwd",
    "pass",
    "passphrase",
    "pat",
    "secret",
    "secrets",
    "credential",
    "credentials",
    "authorization",
    "cookie",
    "signature",
}
_SECRET_JOINED = {"apikey", "authtoken", "accesstoken", "secretkey", "privatekey"}
_SECRET_PAIRS = {
    ("api", "key"),
    ("access", "key"),
    ("private", "key"),
    ("secret", "key"),
    ("signing", "key"),
    ("session", "key"),
    ("auth", "key"),
}
_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
# ``https://${USER}:${TOKEN}@host``: userinfo made of references only (pip expands them on the
# node from its environment), which is what the refusal of a literal credential asks for.
_REFERENCE_USERINFO = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}(:\$\{[A-Za-z_][A-Za-z0-9_]*\})?$")

# The userinfo ends at the *last* ``@`` before the host: a raw password may hold ``@`` and ``/``
# (``user:p@ss/w@host``). A user without a password holds neither, and a port (``host:8080/``)
# is not a password, so ``https://registry:4873/@scope/pkg`` stays as it is.
_URI_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<userinfo>[^/?#@:\s\"'<>]+:(?!\d{1,5}(?:[/?#]|$))[^\s\"'<>]*|[^/?#@:\s\"'<>]+)"
    r"@(?=[^\s/?#@\"'<>]*(?:[/?#\s\"'<>),;]|$))"
)
_QUERY_PARAM = re.compile(r"(?P<key>[?&](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s\"'<>]+)")
_QUERY_SECRET_PART = re.compile(r"token|passw(or)?d|secret|key|signature|credential", re.I)
# Whole parameter names: Azure SAS ``sig``, OAuth ``code``, short ones a substring test misses.
_QUERY_SECRET_NAMES = {"sig", "code", "auth", "pass", "pwd", "session", "x-amz-credential"}
# A header line: everything after the scheme word (``Bearer``, ``Basic``) is the credential.
_HEADER = re.compile(
    r"(?P<head>\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:bearer|basic|token|digest)\s+)?)"
    r"(?P<value>[^\s\"',;]+)|(?P<cookie>\b(?:set-)?cookie\s*:\s*)(?P<jar>[^\r\n]+)",
    re.I,
)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I)
_QUOTED_PAIR = re.compile(
    r"(?P<head>(?P<q>[\"'])(?P<name>[A-Za-z_][\w.-]{0,63})(?P=q)\s*:\s*(?P<vq>[\"']))"
    r"(?P<value>(?:\\.|(?!(?P=vq)).)*)(?P=vq)"
)
# ``NAME=value``, ``export NAME="value"``, ``--password value`` is not covered (no ``=``).
_ASSIGNMENT = re.compile(
    r"(?<![\w$?&.])(?P<head>(?P<name>[A-Za-z_][\w.-]*)\s*=(?!=)\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s\"',;&]+)"
)
_COLON_PAIR = re.compile(
    r"(?<![\w$\"'.-])(?P<head>(?P<name>[A-Za-z_][\w.-]*):[ \t]+)(?P<value>[^\s\"',;{}\[\]]+)"
)


def is_secret_key(name: str) -> bool:
    """True for key names that hold secrets: a word of the name is ``token``, ``password``,
    ``pass``, ``pat``, ``secret``... (``HF_TOKEN``, ``DB_PASS``, ``GITHUB_PAT``, ``apiKey``,
    ``AWS_SECRET_ACCESS_KEY``, ``signing_key``).

    Whole words only, so ``tokenizer``, ``max_new_tokens``, ``passes``, ``pattern`` and
    ``path`` stay visible.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    if _SECRET_WORDS.intersection(words) or _SECRET_JOINED.intersection(words):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def is_reference(value: Any) -> bool:
    """True for ``${NAME}``: a pointer to an environment variable, not the secret itself."""
    return isinstance(value, str) and bool(_REFERENCE.match(value))


def redact_text(text: str) -> str:
    """``text`` with every credential it carries replaced by ``***``, where it stands.

    ``https://user:p@ss@host/x?token=abc&sig=s`` -> ``https://***@host/x?token=***&sig=***``;
    ``Authorization: Bearer abc`` -> ``Authorization: Bearer ***``; ``export DB_PASS=abc``,
    ``"password": "abc"`` and ``HF_TOKEN: abc`` keep their name and lose their value.
    ``${NAME}`` references are kept.
    """
    text = _URI_USERINFO.sub(_userinfo, text)
    text = _QUERY_PARAM.sub(_query_value, text)
    text = _HEADER.sub(_header_value, text)
    text = _BEARER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    text = _QUOTED_PAIR.sub(_quoted_value, text)
    text = _ASSIGNMENT.sub(_named_value, text)
    return _COLON_PAIR.sub(_named_value, text)


def uri_credentials(text: str) -> bool:
    """True when ``text`` holds a literal credential in a URI (``user:pw@``, ``?token=...``);
    ``${NAME}`` references in their place are not credentials."""
    return _QUERY_PARAM.sub(_query_value, _URI_USERINFO.sub(_userinfo, text)) != text


def _userinfo(match: re.Match[str]) -> str:
    if _REFERENCE_USERINFO.match(match["userinfo"]):
        return match[0]
    return f"{match['scheme']}{REDACTED}@"


def _query_value(match: re.Match[str]) -> str:
    name = match["name"]
    secret = (
        _QUERY_SECRET_PART.search(name)
        or name.lower() in _QUERY_SECRET_NAMES
        or is_secret_key(name)
    )
    if not secret or is_reference(match["value"]) or match["value"] == REDACTED:
        return match[0]
    return f"{match['key']}{REDACTED}"


def _header_value(match: re.Match[str]) -> str:
    if match["cookie"] is not None:
        return f"{match['cookie']}{REDACTED}"
    if is_reference(match["value"]):
        return match[0]
    return f"{match['head']}{REDACTED}"


def _quoted_value(match: re.Match[str]) -> str:
    if not is_secret_key(match["name"]) or is_reference(match["value"]) or not match["value"]:
        return match[0]
    return f"{match['head']}{REDACTED}{match['vq']}"


def _named_value(match: re.Match[str]) -> str:
    value = match["value"].strip("\"'")
    if not is_secret_key(match["name"]) or is_reference(value) or value in ("", REDACTED):
        return match[0]
    if match["name"].lower().endswith("authorization"):
        return match[0]  # the header rule already kept its scheme word and hid the credential
    quote = match["value"][0] if match["value"][0] in "\"'" else ""
    return f"{match['head']}{quote}{REDACTED}{quote}"


def _only_references(value: Any) -> bool:
    """True when ``value`` holds no literal: only ``${NAME}`` references, empties, scalars."""
    if isinstance(value, dict):
        return all(_only_references(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_only_references(v) for v in value)
    return value in (None, "") or isinstance(value, bool | int | float) or is_reference(value)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (dicts, lists, strings, scalars) with secrets replaced by ``***``.

    Args:
        value: what is about to be logged, pushed to XCom or sent to MLflow.
        key: the name ``value`` is stored under; a secret-looking name redacts the whole value,
            a dict or list included (except ``${NAME}`` references, empty values and numbers).

    Returns:
        The same structure; non-secret values unchanged.
    """
    if key and is_secret_key(key) and not _only_references(value):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def literal_secrets(value: Any, prefix: str) -> list[str]:
    """Dotted names (``a.b``, ``a.pip[0]``) under ``value`` that hold a literal secret: a
    secret-looking key with anything but ``${NAME}`` references under it (a string, or a dict
    or list holding one), or a string with credentials in a URI; used to refuse secrets
    written into a config file."""
    if isinstance(value, dict):
        found = []
        for name, item in value.items():
            dotted = f"{prefix}.{name}"
            if is_secret_key(str(name)) and not _only_references(item):
                found.append(dotted)
            else:
                found += literal_secrets(item, dotted)
        return found
    if isinstance(value, list | tuple):
        return [f for i, item in enumerate(value) for f in literal_secrets(item, f"{prefix}[{i}]")]
    return [prefix] if isinstance(value, str) and uri_credentials(value) else []
