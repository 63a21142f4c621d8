"""PII scrubbing with typed placeholders and counts per type, on libraries made for each type.

Each type has a detector that finds spans; a cheap prefilter decides whether it runs at all,
so text without PII costs a few regex searches:

- ``secret``: the denylist patterns of detect-secrets' plugins (AWS, GitHub, GitLab, Slack, JWT,
  private keys, OpenAI, Stripe, ...), plus long high-entropy tokens after a key/secret/token
  word. Runs only on text with a run of 20+ token characters or a PEM header.
- ``email``: a regex (plus-addressing, subdomains, quoted local parts). Runs on text with ``@``.
- ``iban``: python-stdnum's ISO 13616 checksum. ``national_id``: US SSNs (stdnum.us.ssn) and
  Spanish DNIs (stdnum.es.dni, a check letter).
- ``card``: 13-19 digits with an issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners,
  UnionPay) and a valid Luhn digit (stdnum.luhn).
- ``ip``: IPv4/IPv6 validated by ``ipaddress``; not a dotted number after "version", "section",
  "release", "build", "§" (``version 1.2.3.4`` is a version).
- ``phone``: phonenumbers' ``PhoneNumberMatcher`` at leniency VALID, over digit runs of 7+
  digits, for each configured region (numbers with ``+`` need no region); not after an
  order/serial/part/lot label, not before a currency.

Detectors run in that order and each sees the text with earlier finds already replaced, so a
card inside a token or an IBAN's digits are never read twice.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import cast

import phonenumbers
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.es import dni as stdnum_es_dni
from stdnum.es import nie as stdnum_es_nie
from stdnum.us import ssn as stdnum_ssn

from pipeline.data.pii_fields import find_field_values

PII_TYPES = ("secret", "email", "iban", "national_id", "card", "ip", "phone")
"""Every built-in type, in the order the detectors run."""

DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "JP", "BR", "AU")
"""Regions national-format phone numbers (without ``+``) are parsed in."""

Span = tuple[int, int]

# Plugins whose denylists have no false positives on prose (Artifactory's ``AP...`` and
# Azure's keyword rules match part numbers and ordinary words, so they are left out).
_SECRET_PLUGINS: tuple[type[RegexBasedDetector], ...] = (
    AWSKeyDetector,
    GitHubTokenDetector,
    GitLabTokenDetector,
    SlackDetector,
    OpenAIDetector,
    StripeDetector,
    SendGridDetector,
    TwilioKeyDetector,
    PypiTokenDetector,
    DiscordBotTokenDetector,
    TelegramBotTokenDetector,
    MailchimpDetector,
    SquareOAuthDetector,
)
# ``denylist`` is a class attribute on each plugin, typed as an abstract property on the base.
_SECRET_PATTERNS = tuple(
    p for plugin in _SECRET_PLUGINS for p in cast("Iterable[re.Pattern[str]]", plugin.denylist)
)
_JWT = JwtTokenDetector.denylist[0]
_PEM_HEADERS = tuple(PrivateKeyDetector.denylist)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=]*")
_JWT_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.]*")
_PEM_BLOCK = re.compile(
    r"-----BEGIN[A-Z ]*PRIVATE KEY( BLOCK)?-----(?:.*?-----END[A-Z ]*PRIVATE KEY( BLOCK)?-----"
    r"|[\sA-Za-z0-9+/=]*)",
    re.DOTALL,
)
# A run this long is needed by every secret pattern (the shortest, Slack's, is ~20 characters).
_LONG_RUN = re.compile(r"[A-Za-z0-9_\-+/=.]{20}|PRIVATE KEY")
# Key-like values the plugins have no pattern for: ``sk-proj-...`` keys, and 32+ character
# runs after a key/secret/token word, e.g. an AWS secret access key not in quotes.
_SK_KEY = re.compile(r"(?<![\w-])sk-(?:proj-|ant-|live-)?[A-Za-z0-9_\-]{20,}")
_KEYWORD_VALUE = re.compile(
    r"(?i)(?:key|secret|token|password|passwd|pwd|credential|auth)[\w ]{0,20}?[\s:=\"']{1,3}"
    r"[\"']?([A-Za-z0-9+/=_\-]{32,})"
)
# A password of any length after its label: ``DB_PASSWORD=3d5O*...``, ``pwd: hunter2!``. The
# label is a word of its own or the last part of a SNAKE_CASE name (``bypass=`` is not one).
_PASSWORD_LABELS = (
    "password|passwd|passphrase|pwd|pass|passwort|kennwort|contraseña|contrasena|clave|senha"
    "|mot de passe|mdp|パスワード"
)
_PASSWORD_VALUE = re.compile(
    rf"(?i)(?<![a-z0-9_])(?:[a-z0-9]+_)*(?:{_PASSWORD_LABELS})(?![a-z])"
    r"\s*(?:[:=：]|\s(?:is|es|est|ist|é|è|era|was)\s)\s*[\"'「]?([^\s\"',;」』、。）)]{6,})"
)
# Cheap test for a label before the pattern runs (lower-cased text).
_PASSWORD_HINTS = ("pass", "pwd", "kennwort", "contrase", "clave", "senha", "mdp", "パスワード")

_EMAIL = re.compile(
    r"(?:\"[^\"\n@]{1,64}\"|(?<![\w.+%'-])[\w.+%'-]{1,64})@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
_DOMAIN_CHARS = re.compile(r"[A-Za-z0-9.-]*")
_SSH_PATH = re.compile(r":[\w~/.-]")
# In capitals or, as a JSON field or a form may hold it, all in lower case.
_IBAN = re.compile(
    r"(?<![\w-])(?:[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
    r"|[a-z]{2}\d{2}(?: ?[a-z0-9]{4}){2,7}(?: ?[a-z0-9]{1,3})?)(?![\w-])",
    re.ASCII,
)
_SSN = re.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-])", re.ASCII)
# Nine bare digits are an SSN only after its label.
_SSN_LABELLED = re.compile(
    r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\s*(?:#|no\.?)?\s*[:#]?\s*(\d{9})(?![\w-])",
    re.ASCII,
)
# ``12345678Z``, ``12345678-Z``, ``12.345.678-Z``; a lower-case letter only after a DNI label.
_DNI = re.compile(r"(?<![\w.-])(\d{8}|\d{2}\.\d{3}\.\d{3})-?([A-Za-z])(?![\w-])", re.ASCII)
# Foreigners' NIE: X, Y or Z, seven digits, a check letter (``X-4548990-G``, ``Z5014447S``).
_NIE = re.compile(r"(?<![\w-])[XYZ]-?\d{7}-?[A-Z](?![\w-])", re.ASCII)
_DNI_LABEL = re.compile(r"(?i)\b(?:dni|nif|nie)\b(?:\s+\w{1,4}){0,2}\W{0,3}$")
_CARD = re.compile(r"(?<![\w.#/-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)", re.ASCII)
_CARD_ISSUER = re.compile(
    r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6(?:011|5|4[4-9]|22)"
    r"|35(?:2[89]|[3-8]\d)|3(?:0[0-5]|[689])|62"
    r"|50(?:18|20|38)|5893|6304|6759|676[1-3]"  # Maestro
    r"|636(?:297|368)|504175|5067|509|6277|650|6516|6550"  # Elo
    r"|60|8[12]|508"  # RuPay
)
_DIGIT_DOT = re.compile(r"[0-9]\.[0-9]")  # _IPV4 is ASCII; [0-9] scans faster than \d
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:])")
# "version 1.2.3.4", "Section 4.2.1.3", "v 10.0.0.1": a dotted number that the words before it
# call a version or a section.
# ``version`` may end a longer name (``AssemblyVersion("1.0.0.0")``, ``fileVersion=``).
_VERSION_WORD = re.compile(
    r"(?i)(?:version|\bver\.?|\bv\.?|\bsection|\bsec\.?|§|\brelease|\bbuild|\brev\.?|"
    r"\brevision|\bchapter|\bclause|\bparagraph|\bpatch|\bfirmware|\bupdate|\bkernel)"
    r"(?:\s+(?:notes?|for|of|is|to|from|number|no\.?))*[\s(\"'=:]*$"
)
# re.ASCII: a number written against Japanese or Hindi text (``に090-7842-3864へ``) is still one.
_PHONE_CANDIDATE = re.compile(r"(?<![\w.#/-])\+?\(?\d[\d ()./-]{5,}\d(?![\w])", re.ASCII)
# "order 4512 7788", "serial 2019 2020 2021": numbers with a label are identifiers, not phones.
_ID_LABEL = re.compile(
    r"(?i)(?:order|invoice|ticket|ref|reference|tracking|case|id|sku|account|acct|serial|s/n|"
    r"part|lot|batch|model|item|isbn|po|number)\.?\s*(?:no\.?|number|num|#)?\s*[:#]?\s*$"
)
# "mobile=9845012346", "Tel.: 4155550123": a bare run of digits is a phone after its label.
_PHONE_LABEL = re.compile(
    r"(?i)\b(?:phone|mobile|mob|cell|tel|telephone|whatsapp|call|contact|ph|fax)\.?\s*"
    r"(?:no\.?|number|#)?\s*[:=#]?\s*$"
)
# A date or a time the matcher may take for a number: ``2026-03-03 14`` in a log line.
_DATE_LIKE = re.compile(
    r"(?:19|20)\d\d[-/.][01]\d[-/.][0-3]\d|[0-3]?\d[-/.][01]?\d[-/.](?:19|20)\d\d"
)
_TIME_AFTER = re.compile(r"^:[0-5]\d")
_CURRENCY_AFTER = re.compile(r"^\s*(?:EUR|USD|GBP|JPY|CHF|INR|BRL|AUD|[€$£¥₹]|kr\b|euros?)")
_TWO_DIGITS = re.compile(r"[0-9][0-9]")  # every digit-type pattern is ASCII
# Types whose every value holds two digits in a row (an IPv4 address may not: ``1.2.3.4``).
_DIGIT_TYPES = frozenset({"iban", "national_id", "card", "phone"})
# Every value of a digit type is made of these characters only (IBAN letters are capitals, a
# DNI ends in one) and holds a digit, so it lies inside one run of them that starts at a digit,
# or at most two characters before it (``DE89``, ``+(``).
_NUMBER_RUN = re.compile(r"[0-9][0-9A-Z ()./+-]*")
# What a digit-type detector reads around a value: one character before and after it (the
# patterns' boundaries), the label before a phone (``_ID_LABEL``, 24) and the currency after
# it, plus the two leading characters above.
_WINDOW_MARGIN = 32
# A lower-case IBAN leaves the run after its check digits: its window reaches its whole length.
_IBAN_MARGIN = 48
_SEVEN_DIGITS = re.compile(r"(?:\d\D{0,3}){7}")
_DECIMAL = re.compile(r"\d+[.,]\d+")
# National numbers written in groups of one or two digits without a trunk ``0`` are lists of
# small numbers ("38 40 42 37 39"); French ``01 42 68 53 00`` starts with its ``0``.
_SMALL_GROUPS = re.compile(r"[1-9]\d?(?:[ .-]\d{1,2}){3,}")
_ONE_DIGIT_GROUP = re.compile(r"(?:^|[ .-])\d(?:[ .-]|$)")
_NANP_TRUNK = re.compile(r"^1[ .-](?=\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}$)")


class PiiScrubber:
    """Replaces PII with typed placeholders; ``counts`` accumulates replacements per type.

    Args:
        extra: ``{TYPE: regex}`` patterns applied after the built-in types.
        types: the built-in types to detect (``PII_TYPES`` by default); the others are kept.
        placeholders: ``{type: placeholder}`` overrides; the default is ``<TYPE>``.
        phone_regions: regions for national-format phone numbers (``DEFAULT_PHONE_REGIONS``).
    """

    def __init__(
        self,
        extra: dict[str, str] | None = None,
        *,
        types: Iterable[str] | None = None,
        placeholders: dict[str, str] | None = None,
        phone_regions: Sequence[str] | None = None,
    ) -> None:
        enabled = set(PII_TYPES if types is None else types)
        unknown = enabled - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; expected some of {PII_TYPES}")
        self.types = [t for t in PII_TYPES if t in enabled]
        self.placeholders = {t: f"<{t.upper()}>" for t in PII_TYPES} | dict(placeholders or {})
        self.phone_regions = tuple(phone_regions or DEFAULT_PHONE_REGIONS)
        self.extra = [(name.lower(), re.compile(p)) for name, p in (extra or {}).items()]
        self.counts: Counter[str] = Counter()
        finders: dict[str, Callable[[str], Iterator[Span]]] = {
            "secret": find_secrets,
            "email": find_emails,
            "iban": find_ibans,
            "national_id": find_national_ids,
            "card": find_cards,
            "ip": find_ips,
            "phone": self._find_phones,
        }
        self._finders = [(t, finders[t]) for t in self.types]
        self._enabled = frozenset(self.types)

    def scrub(self, text: str) -> str:
        """Return ``text`` with every enabled type's finds replaced by its placeholder."""
        # Most text has no two digits in a row; then no digit type can match, and one cheap
        # search saves their ~10x dearer patterns.
        text = self._replace_fields(text)
        digits = _TWO_DIGITS.search(text) is not None
        runs: list[Span] | None = None  # number runs of ``text`` as it is now
        for kind, find in self._finders:
            if kind not in _DIGIT_TYPES:
                spans = list(find(text))
            elif digits:
                runs = number_runs(text) if runs is None else runs
                margin = _IBAN_MARGIN if kind == "iban" else _WINDOW_MARGIN
                spans = _find_near_numbers(find, text, runs, margin)
            else:
                continue
            if spans:
                text, runs = self._replace(text, kind, spans), None
        for name, pattern in self.extra:
            text = self._replace(text, name, [m.span() for m in pattern.finditer(text)])
        return text

    def _replace_fields(self, text: str) -> str:
        """Replace the values of PII-named fields (``pii_fields``) that pass their type's check,
        all types in one pass (their spans are of the text as it is now)."""
        found = []
        for kind, start, stop in find_field_values(text):
            if kind in self._enabled and _FIELD_CHECKS[kind](text[start:stop], self.phone_regions):
                found.append((start, stop, kind))
        if not found:
            return text
        pieces, end = [], 0
        for start, stop, kind in sorted(found):
            if start < end:
                continue  # a value two structures name (a key inside a table cell)
            pieces += [text[end:start], self.placeholders.get(kind, f"<{kind.upper()}>")]
            end = stop
            self.counts[kind] += 1
        pieces.append(text[end:])
        return "".join(pieces)

    def _replace(self, text: str, kind: str, spans: list[Span]) -> str:
        if not spans:
            return text
        placeholder = self.placeholders.get(kind, f"<{kind.upper()}>")
        pieces, end = [], 0
        for start, stop in _merge(spans):
            pieces += [text[end:start], placeholder]
            end = stop
            self.counts[kind] += 1
        pieces.append(text[end:])
        return "".join(pieces)

    def _find_phones(self, text: str) -> Iterator[Span]:
        return find_phones(text, self.phone_regions)


def number_runs(text: str) -> list[Span]:
    """Spans of the runs of number characters in ``text`` (``_NUMBER_RUN``)."""
    return [m.span() for m in _NUMBER_RUN.finditer(text)]


def number_windows(
    text: str, margin: int = _WINDOW_MARGIN, runs: list[Span] | None = None
) -> list[Span]:
    """The parts of ``text`` a digit-type detector can find anything in: each run of number
    characters (``runs``, found when not given) with ``margin`` characters either side,
    overlapping windows joined.

    A detector run on each window finds what it finds on the whole text (every value and the
    context it reads lie inside one window) at a fraction of the cost: prose is mostly words.
    """
    windows: list[Span] = []
    for run_start, run_stop in number_runs(text) if runs is None else runs:
        start, stop = max(0, run_start - margin), run_stop + margin
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], stop)
        else:
            windows.append((start, stop))
    return [(start, min(stop, len(text))) for start, stop in windows]


def _find_near_numbers(
    find: Callable[[str], Iterator[Span]], text: str, runs: list[Span], margin: int
) -> list[Span]:
    """``find`` over ``number_windows(text, margin, runs)``, spans in ``text``'s offsets."""
    if len(text) <= 4 * margin:
        return list(find(text))
    spans = []
    for start, stop in number_windows(text, margin, runs):
        spans += [(start + a, start + b) for a, b in find(text[start:stop])]
    return spans


def _merge(spans: list[Span]) -> list[Span]:
    """Sorted, non-overlapping spans (overlapping finds of one type become one)."""
    merged: list[Span] = []
    for start, stop in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _entropy(token: str) -> float:
    """Shannon entropy in bits per character: ~4-6 for random base64, ~3-4 for random hex."""
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in Counter(token).values())


def find_secrets(text: str) -> Iterator[Span]:
    """Spans of credentials: detect-secrets' denylist patterns, PEM private keys, key-like tokens.

    Args:
        text: any text.

    Returns:
        ``(start, end)`` of each secret value (the value only, not the ``key=`` before it).
    """
    lower = text.lower()
    if any(hint in lower for hint in _PASSWORD_HINTS):
        for m in _PASSWORD_VALUE.finditer(text):
            value = m.group(1)
            # A password has a letter and a digit or symbol ("password: reset" is prose).
            if not _reference_or_mask(value) and _mixed(value):
                yield m.span(1)
    if not _has_long_run(text):
        return
    for pattern in _SECRET_PATTERNS:
        for m in pattern.finditer(text):
            start = m.start(1) if m.re.groups and m.start(1) >= 0 else m.start()
            yield start, _TOKEN_CHARS.match(text, m.end()).end()  # type: ignore[union-attr]
    for m in _JWT.finditer(text):
        stop = _JWT_CHARS.match(text, m.end()).end()  # type: ignore[union-attr]
        if JwtTokenDetector.is_formally_valid(text[m.start() : stop].rstrip(".")):
            yield m.start(), len(text[:stop].rstrip("."))
    if "PRIVATE KEY" in text and any(p.search(text) for p in _PEM_HEADERS):
        yield from (m.span() for m in _PEM_BLOCK.finditer(text))
    for m in _SK_KEY.finditer(text):
        yield m.span()
    for m in _KEYWORD_VALUE.finditer(text):
        if _entropy(m.group(1)) >= 3.5:
            yield m.span(1)


def _reference_or_mask(value: str) -> bool:
    """A value that stands for a secret without being one: ``${DB_PASS}``, ``%(token)s``,
    ``{key}``, ``<redacted>``, ``******``."""
    return value[0] in "$<*%{"


def _mixed(value: str) -> bool:
    return any(c.isalpha() for c in value) and any(not c.isalpha() for c in value)


def find_emails(text: str) -> Iterator[Span]:
    """Spans of e-mail addresses, searched for only around each ``@``.

    An address holds one ``@``, its local part at most 66 characters before it (64 and the
    quotes) and its domain in the run of domain characters after it: the pattern runs on those
    windows (``pos``/``endpos``, so its look-behind still sees the text before a window) and
    finds what it would find on the whole text.
    """
    windows: list[Span] = []
    at = text.find("@")
    while at >= 0:
        start = max(0, at - 66)
        stop = min(len(text), _DOMAIN_CHARS.match(text, at + 1).end() + 1)  # type: ignore[union-attr]
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], stop)
        else:
            windows.append((start, stop))
        at = text.find("@", at + 1)
    for start, stop in windows:
        for m in _EMAIL.finditer(text, start, stop):
            # ``git@github.com:org/repo.git`` is an SSH remote, not an address.
            if not _SSH_PATH.match(text, m.end()):
                yield m.span()


def find_ibans(text: str) -> Iterator[Span]:
    """Spans of IBANs, with or without spaces, that pass stdnum's country format and checksum."""
    for m in _IBAN.finditer(text):
        # The pattern may take a following capitalised group ("... 00 ABCD"): drop trailing
        # groups until the number is valid.
        value = m.group(0)
        while len(value) >= 15:
            if stdnum_iban.is_valid(value):
                yield m.start(), m.start() + len(value)
                break
            value = value[: value.rfind(" ")] if " " in value[4:] else value[:-1]


def find_national_ids(text: str) -> Iterator[Span]:
    """Spans of US SSNs (``078-05-1120`` style, area/group/serial rules) and Spanish DNIs."""
    for m in _SSN.finditer(text):
        if stdnum_ssn.is_valid(m.group(0).replace(" ", "-")):
            yield m.span()
    for m in _SSN_LABELLED.finditer(text):
        if stdnum_ssn.is_valid(m.group(1)):
            yield m.span(1)
    for m in _DNI.finditer(text):
        digits, letter = m.group(1).replace(".", ""), m.group(2)
        if letter.islower() and not _DNI_LABEL.search(text[max(0, m.start() - 20) : m.start()]):
            continue
        if stdnum_es_dni.is_valid(digits + letter.upper()):
            yield m.span()
    for m in _NIE.finditer(text):
        if stdnum_es_nie.is_valid(m.group(0).replace("-", "")):
            yield m.span()


def find_cards(text: str) -> Iterator[Span]:
    """Spans of payment card numbers: an issuer prefix, 13-19 digits, a valid Luhn digit."""
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group(0))
        if _CARD_ISSUER.match(digits) and luhn.is_valid(digits):
            yield m.span()


def find_ips(text: str) -> Iterator[Span]:
    """Spans of IPv4 and IPv6 addresses, except dotted numbers that follow a version word."""
    if _DIGIT_DOT.search(text):
        for m in _IPV4.finditer(text):
            before = text[max(0, m.start() - 20) : m.start()]
            if _valid_ip(m.group(0)) and not _VERSION_WORD.search(before):
                yield m.span()
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            candidate = m.group(0).split("%", 1)[0]
            if sum(1 for g in candidate.split(":") if g) >= 2 and _valid_ip(candidate):
                yield m.span()


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _has_long_run(text: str) -> bool:
    """``_LONG_RUN.search(text)``, sooner: a run of 20 of its characters (none is whitespace)
    lies inside one whitespace-separated word of 20 or more, and most text has none (the
    pattern alone tries at every word)."""
    if "PRIVATE KEY" in text:
        return True
    words = text.split()
    if max(map(len, words), default=0) < 20:
        return False
    return any(_LONG_RUN.search(word) for word in words if len(word) >= 20)


def find_phones(text: str, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> Iterator[Span]:
    """Spans of phone numbers valid for phonenumbers in one of ``regions`` (or with ``+``).

    Args:
        text: any text.
        regions: ISO 3166 region codes national formats are parsed in, in order.

    Returns:
        ``(start, end)`` of each number; identifiers after a label (order, serial, part, lot,
        ...) and amounts before a currency are left out.
    """
    if not _SEVEN_DIGITS.search(text):
        return
    for cand in _PHONE_CANDIDATE.finditer(text):
        digits = sum(c.isdigit() for c in cand.group(0))
        if digits < 7 or _DECIMAL.fullmatch(cand.group(0)):
            continue
        # A number with ``+`` carries its country: one pass, whatever the regions.
        labelled = _PHONE_LABEL.search(text[max(0, cand.start() - 24) : cand.start()]) is not None
        for region in ("ZZ",) if cand.group(0).startswith("+") else regions:
            spans = _phones_in(cand.group(0), region, whole=digits <= 12, labelled=labelled)
            if spans:
                break
        for match_start, match_end in spans:
            start, stop = cand.start() + match_start, cand.start() + match_end
            before = text[max(0, start - 24) : start]
            # A number with ``+`` or after a phone label ("phone number", "mobile no.") is a
            # phone whatever else the words before it say.
            plus = text.startswith("+", start)
            if not (plus or labelled) and _ID_LABEL.search(before):
                continue
            if _CURRENCY_AFTER.match(text[stop:]):
                continue
            if _DATE_LIKE.search(text, start, stop) or _TIME_AFTER.match(text[stop : stop + 3]):
                continue
            yield start, stop


@lru_cache(maxsize=65536)
def _phones_in(
    candidate: str, region: str, whole: bool, labelled: bool = False
) -> tuple[Span, ...]:
    """Valid numbers in one digit run, found by ``PhoneNumberMatcher`` at leniency VALID.

    A phone-sized run (``whole``) that does not even parse as a valid number is dropped first:
    parsing is ~30x cheaper than the matcher, and most digit runs in text are not phones.
    Cached: a corpus repeats its numbers (a hotline in every signature, a shop's own number),
    and the answer depends on the arguments only (a tuple: a cached value cannot be changed).
    """
    if whole:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            return ()
        if not phonenumbers.is_valid_number(number):
            return ()
    leniency = phonenumbers.Leniency.VALID
    matches = phonenumbers.PhoneNumberMatcher(candidate, region, leniency=leniency)
    return tuple(
        (m.start, m.end) for m in matches if not _looks_like_a_list(m.raw_string, labelled)
    )


def _looks_like_a_list(number: str, labelled: bool = False) -> bool:
    """A national number (no ``+``) that reads as other numbers: in small or one-digit groups
    (``1 2 3 4 5``), or a bare integer without trunk ``0`` (``482913756``: a count or an id)
    unless a phone label precedes it. A leading ``1-`` is North America's trunk prefix."""
    if number.startswith("+"):
        return False
    if number.isdigit() and not number.startswith("0"):
        return not labelled
    number = _NANP_TRUNK.sub("", number)
    return bool(_SMALL_GROUPS.fullmatch(number) or _ONE_DIGIT_GROUP.search(number))


def _field_secret(value: str, regions: Sequence[str]) -> bool:
    # Key-like: 8+ characters with a letter and a digit or symbol, or 16+ of anything.
    if len(value) < 8 or _reference_or_mask(value) or " " in value:
        return False
    return _mixed(value) or len(value) >= 16


def _field_phone(value: str, regions: Sequence[str]) -> bool:
    for region in ("ZZ",) if value.startswith("+") else regions:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(value, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def _field_national_id(value: str, regions: Sequence[str]) -> bool:
    compact = re.sub(r"[\s.-]", "", value).upper()
    if compact.isdigit() and len(compact) == 9:
        return bool(stdnum_ssn.is_valid(compact))
    return bool(stdnum_es_dni.is_valid(compact) or stdnum_es_nie.is_valid(compact))


def _field_card(value: str, regions: Sequence[str]) -> bool:
    digits = re.sub(r"[ -]", "", value)
    return digits.isdigit() and 12 <= len(digits) <= 19 and bool(luhn.is_valid(digits))


_FIELD_CHECKS: dict[str, Callable[[str, Sequence[str]], bool]] = {
    "secret": _field_secret,
    "email": lambda value, regions: _EMAIL.fullmatch(value) is not None,
    "iban": lambda value, regions: bool(stdnum_iban.is_valid(value)),
    "national_id": _field_national_id,
    "card": _field_card,
    "phone": _field_phone,
}
"""Whether a value under a field of that type is one (``ip`` has no field names)."""


def scrub_pii(text: str) -> tuple[str, int]:
    """Scrub every built-in type; returns the text and how many values were replaced."""
    scrubber = PiiScrubber()
    out = scrubber.scrub(text)
    return out, sum(scrubber.counts.values())
