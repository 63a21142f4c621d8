"""PII scrubbing with typed placeholders and counts per type.

Built in: e-mail addresses, payment card numbers (13-19 digits passing the Luhn check, replaced
whole), IPv4 and IPv6 addresses, and phone numbers. Dates, times, order and ticket numbers are
not phones: a phone needs groups of 3-4 digits joined by spaces or hyphens, is not part of a
longer token (``#4512-7788``, ``ORD-2024-0012``) and does not follow an order/ticket label.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<![\w.#/-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w(#/.-])(?:\+\d{1,3}[ -]?)?(?:\(\d{2,4}\)[ -]?)?\d{3,4}(?:[ -]\d{3,4}){1,2}(?![\w-]|\.\d)"
)
# "order 4512 7788", "ticket no. 1001-2002": numbers with a label are identifiers, not phones.
_ID_LABEL = re.compile(
    r"(?:order|invoice|ticket|ref|reference|tracking|case|id|sku|account|acct)\.?\s*"
    r"(?:no\.?|number|num|#)?\s*[:#]?\s*$",
    re.IGNORECASE,
)
_DIGIT = re.compile(r"\d")

BUILTIN_TYPES = ("email", "card", "ip", "phone")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class PiiScrubber:
    """Replaces PII with ``<TYPE>`` placeholders; ``counts`` accumulates matches per type.

    Args:
        extra: ``{TYPE: regex}`` patterns applied after the built-in ones.
    """

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        self.extra = [(name.lower(), re.compile(p)) for name, p in (extra or {}).items()]
        self.counts: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        if "@" in text:
            text = self._sub(_EMAIL, "email", text)
        if _DIGIT.search(text):
            text = self._sub(_CARD, "card", text, _is_card)
            text = self._sub(_IPV4, "ip", text)
        if "::" in text or text.count(":") >= 7:
            text = self._sub(_IPV6, "ip", text, _is_ipv6)
        if _DIGIT.search(text):
            text = self._sub(_PHONE, "phone", text, _is_phone)
        for name, pattern in self.extra:
            text = self._sub(pattern, name, text)
        return text

    def _sub(
        self,
        pattern: re.Pattern[str],
        kind: str,
        text: str,
        accept: Callable[[re.Match[str]], bool] | None = None,
    ) -> str:
        placeholder = f"<{kind.upper()}>"

        def replace(match: re.Match[str]) -> str:
            if accept is not None and not accept(match):
                return match.group(0)
            self.counts[kind] += 1
            return placeholder

        return pattern.sub(replace, text)


def _is_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", match.group(0))
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_ipv6(match: re.Match[str]) -> bool:
    candidate = match.group(0).split("%", 1)[0]
    if not re.search(r"[0-9A-Fa-f]", candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_phone(match: re.Match[str]) -> bool:
    before = match.string[max(0, match.start() - 24) : match.start()]
    return not _ID_LABEL.search(before)


def scrub_pii(text: str) -> tuple[str, int]:
    """Scrub with the built-in patterns; returns the text and how many were replaced."""
    scrubber = PiiScrubber()
    out = scrubber.scrub(text)
    return out, sum(scrubber.counts.values())
