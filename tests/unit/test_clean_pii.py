"""Cleaning keeps meaning; PII scrubbing removes the planted values and keeps look-alikes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import phonenumbers
import pytest

from pipeline.config import DataConfig
from pipeline.data.clean import clean_text, split_long_document
from pipeline.data.pii import DEFAULT_PHONE_REGIONS, PII_TYPES, PiiScrubber, scrub_pii

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pii_accuracy.py"


def test_clean_text_keeps_indentation_and_inner_spaces() -> None:
    assert clean_text("def f():\n    return 1") == "def f():\n    return 1"
    assert clean_text("a  |  b\n\tc") == "a  |  b\n\tc"


def test_clean_text_normalizes_and_drops_control_characters() -> None:
    raw = "\n\nCafe\u0301 \x00bell\x07  \r\nline two\r\n\n\n\n\nend  \n"
    assert clean_text(raw) == "Caf\u00e9 bell\nline two\n\nend"
    assert clean_text(" \n\t\n ") == ""


def test_long_documents_split_at_paragraphs_then_lines() -> None:
    paragraphs = [f"paragraph {i} " + "x" * 40 for i in range(10)]
    pieces = split_long_document("\n\n".join(paragraphs), max_chars=120)
    assert all(len(p) <= 120 for p in pieces)
    assert "\n\n".join(pieces) == "\n\n".join(paragraphs)
    one_line = "word " * 100
    assert all(len(p) <= 60 for p in split_long_document(one_line.strip(), 60))
    assert split_long_document("short", 60) == ["short"]


def _accuracy() -> dict:
    # The benchmark's evaluation, so the test and the printed table count the same way.
    spec = importlib.util.spec_from_file_location("pii_accuracy", _BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pii_accuracy"] = module
    spec.loader.exec_module(module)
    return module.evaluate()


def test_planted_values_are_removed_and_look_alikes_kept() -> None:
    r = _accuracy()
    planted, removed = r["planted"], r["removed"]
    assert sum(planted.values()) >= 100
    assert set(planted) == set(PII_TYPES)
    recall = sum(removed.values()) / sum(planted.values())
    assert recall >= 0.97, r["missed"]
    assert r["benign"] >= 100
    assert len(r["changed"]) / r["benign"] <= 0.02, r["changed"]


def test_scrub_replaces_each_type_and_counts_it() -> None:
    scrubber = PiiScrubber()
    text = (
        "Mail jane.doe+orders@mail.example.co.uk, call +1 202-555-0143 or 020 7946 0958, "
        "card 4111 1111 1111 1111 (also 4012-8888-8888-1881), from 192.168.10.7 or "
        "2001:db8::8a2e:370:7334, IBAN DE89 3704 0044 0532 0130 00, SSN 536-90-4399, "
        "key AKIAIOSFODNN7EXAMPLE."
    )
    assert scrubber.scrub(text) == (
        "Mail <EMAIL>, call <PHONE> or <PHONE>, card <CARD> (also <CARD>), from <IP> or <IP>, "
        "IBAN <IBAN>, SSN <NATIONAL_ID>, key <SECRET>."
    )
    assert dict(scrubber.counts) == {
        "email": 1, "phone": 2, "card": 2, "ip": 2, "iban": 1, "national_id": 1, "secret": 1,
    }  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "Delivered on 2026-11-29 at 20:00, or 11/29/2026, or 29.11.2026.",
        "Order #4512-7788 shipped; order 4512 7788; ticket no. 1001-2002; ORD-2024-001234.",
        "Surge multiplier 2.4, rated 4 stars, version 1.2.3, took 12:30:45.",
        "Reference 4111 1111 1111 1112 fails the Luhn check.",
        "Upgrade to version 1.2.3.4; see Section 4.2.1.3.",
        "The flat costs 1 299 000 EUR; revenue grew in 2019 2020 2021.",
    ],
)
def test_dates_versions_and_order_numbers_are_not_pii(text: str) -> None:
    assert scrub_pii(text) == (text, 0)


def test_configured_placeholder_and_disabled_type() -> None:
    scrubber = PiiScrubber(types=["email", "card"], placeholders={"email": "[email]"})
    text = "jane@example.com paid 4111 1111 1111 1111 from 10.0.0.1, call +44 20 7946 0958"
    assert scrubber.scrub(text) == "[email] paid <CARD> from 10.0.0.1, call +44 20 7946 0958"
    assert dict(scrubber.counts) == {"email": 1, "card": 1}


def test_phone_regions_decide_national_formats() -> None:
    # "030 901820" is a Berlin number only when German national formats are read.
    assert PiiScrubber(phone_regions=["DE"]).scrub("Tel. 030 901820") == "Tel. <PHONE>"
    assert PiiScrubber(phone_regions=["US"]).scrub("Tel. 030 901820") == "Tel. 030 901820"


def test_extra_patterns_get_typed_placeholders() -> None:
    scrubber = PiiScrubber({"EMPLOYEE_ID": r"\bEMP-\d{6}\b"})
    assert scrubber.scrub("badge EMP-123456 at desk") == "badge <EMPLOYEE_ID> at desk"
    assert scrubber.counts["employee_id"] == 1


def _data_config(fields: dict) -> DataConfig:
    return DataConfig.model_validate(
        {"domain_corpus": "d.jsonl", "instructions": "i.jsonl", **fields}
    )


def test_config_defaults_match_the_scrubber() -> None:
    d = _data_config({})
    assert tuple(d.pii_types) == PII_TYPES
    assert tuple(d.phone_regions) == DEFAULT_PHONE_REGIONS
    # The config skips importing phonenumbers for the default list: it must stay valid.
    assert set(DEFAULT_PHONE_REGIONS) <= phonenumbers.SUPPORTED_REGIONS


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pii_types": ["email", "passport"]}, "pii_types"),
        ({"pii_types": ["email"], "pii_placeholders": {"card": "[card]"}}, "pii_placeholders"),
        ({"pii_placeholders": {"email": " "}}, "pii_placeholders"),
        ({"phone_regions": ["XX"]}, "phone_regions"),
        ({"phone_regions": []}, "phone_regions"),
    ],
)
def test_bad_pii_config_names_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _data_config(fields)


def test_unknown_type_in_the_scrubber_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiScrubber(types=["email", "passport"])


def _number_like_texts(n: int) -> list[str]:
    """Random text dense in what the detectors look at: digit groups, separators, ``@``,
    labels, currencies, IBAN and key prefixes, between words and newlines."""
    import random

    rng = random.Random(0)
    alphabet = [*"0123456789" * 6, *" -./()+@:#" * 2, *"abcdefxyzABCDEFZ", "\n", "EUR ",
                "order ", "version ", ".com", "user", "+44 ", "DE89 ", "nl91 ", "dni ", "SSN: ",
                "sk-", "key=", "_",
                "word " * 12]  # fmt: skip
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 600))) for _ in range(n)]


def test_windowed_detectors_find_what_they_find_on_the_whole_text() -> None:
    """The scrubber runs the digit types only near number runs and e-mails only near ``@``;
    the windows must lose nothing and add nothing."""
    from pipeline.data import pii

    finders = [
        (pii.find_ibans, pii._IBAN_MARGIN),
        (pii.find_national_ids, pii._WINDOW_MARGIN),
        (pii.find_cards, pii._WINDOW_MARGIN),
        (pii.find_phones, pii._WINDOW_MARGIN),
    ]
    found = long_runs = 0
    for text in _number_like_texts(3000):
        for find, margin in finders:
            whole = list(find(text))
            near = pii._find_near_numbers(find, text, pii.number_runs(text), margin)
            assert near == whole, (find.__name__, text)
            found += len(whole)
        full = [
            m.span() for m in pii._EMAIL.finditer(text) if not pii._SSH_PATH.match(text, m.end())
        ]
        assert list(pii.find_emails(text)) == full, text
        found += len(full)
        # The secret finder's word-length test agrees with the pattern it stands in front of.
        assert pii._has_long_run(text) == (pii._LONG_RUN.search(text) is not None), text
        long_runs += pii._has_long_run(text)
    assert found > 300  # the texts do hold values of these types
    assert 100 < long_runs < 2900  # and both kinds of text for the word-length test


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"customer": "Dana", "phone": "8327965565"}', '{"customer": "Dana", "phone": "<PHONE>"}'),
        ("DB_PASSWORD=3d5OUKe*7rElyJ98Zzl+\nDB_HOST=db", "DB_PASSWORD=<SECRET>\nDB_HOST=db"),
        ("API_KEY=${API_KEY}", "API_KEY=${API_KEY}"),  # a reference, not a secret
        ("id\tmerchant\tapi_key\n4471\tSushi Go\tshpat_69cecab662faef64ac9ae0",
         "id\tmerchant\tapi_key\n4471\tSushi Go\t<SECRET>"),
        ("applicant_id,ssn,state\n77812,580857947,TX\n77813,666123456,TX",
         # No SSN starts with 666: a cell is replaced only when it is one.
         "applicant_id,ssn,state\n77812,<NATIONAL_ID>,TX\n77813,666123456,TX"),
        ("INSERT INTO driver_tax (driver_id, ssn, ok) VALUES (5521, '035791202', TRUE);",
         "INSERT INTO driver_tax (driver_id, ssn, ok) VALUES (5521, '<NATIONAL_ID>', TRUE);"),
        ("order_id,total,phone_verified\n7781,12.50,true", "order_id,total,phone_verified\n7781,12.50,true"),
    ],
)  # fmt: skip
def test_values_are_recognised_by_the_name_of_their_field(text: str, expected: str) -> None:
    assert PiiScrubber().scrub(text) == expected
