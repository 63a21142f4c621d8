"""The HTML evaluation report: decision, gate table, valid PNG plots, escaped answers."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import EvalConfig
from pipeline.eval.gates import decide
from pipeline.eval.report import BPB_PNG, INSTRUCTIONS_PNG, LOSS_CURVES_PNG, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CFG = EvalConfig(bootstrap_samples=200, confidence=0.9)
ATTACK = "<script>alert('x')</script> & more"


def _documents(rng: np.random.Generator, nbytes: np.ndarray, change: float) -> dict[str, Any]:
    nll = nbytes * math.log(2) * (1.2 + change + 0.02 * rng.standard_normal(len(nbytes)))
    docs = [
        {"nll": float(a), "tokens": int(b) // 4, "bytes": int(b)}
        for a, b in zip(nll, nbytes, strict=True)
    ]
    return {"documents": docs, "bits_per_byte": float(nll.sum() / math.log(2) / nbytes.sum())}


def _model(
    rng: np.random.Generator, change: float, rouge: float, generations: bool
) -> dict[str, Any]:
    nbytes = np.arange(200, 200 + 40 * 30, 30)  # the same 40 documents for every model
    examples = [
        {
            "prompt": f"q{i}",
            "reference": f"a{i}",
            "answer": f"answer {i}",
            "exact_match": float(rng.random() < 0.5),
            "rouge_l": float(np.clip(rouge + 0.1 * rng.standard_normal(), 0, 1)),
            "json_valid": None,
            "json_keys": None,
            "keywords": None,
        }
        for i in range(20 if generations else 0)
    ]
    return {
        "domain": _documents(rng, nbytes, change),
        "general": _documents(rng, nbytes, 0.0),
        "answer_loss": _documents(rng, nbytes, change),
        "instructions": {"examples": examples},
    }


def _report(champion: bool = True, rouge: float = 0.6, generations: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    changes = {"base": 0.3, "cpt": 0.1, "candidate": -0.05} | (
        {"champion": 0.0} if champion else {}
    )
    scores = {
        m: _model(rng, c, rouge if m == "candidate" else 0.6, generations)
        for m, c in changes.items()
    }
    samples = [
        {
            "prompt": "Summarise the policy.",
            "reference": "It covers X.",
            "candidate": ATTACK,
            "champion": "It covers Y." if champion else None,
        },
        {
            "prompt": "List <b>keys</b>",
            "reference": '{"a": 1}',
            "candidate": '{"a": 1}',
            "champion": '{"b": 2}' if champion else None,
        },
    ]
    return {
        "scores": scores,
        "champion_version": "3" if champion else None,
        **decide(scores, CFG),
        "samples": samples if generations else [],
    }


LOSS = {
    "cpt": [(step, 6.0 * math.exp(-step / 40) + 2.0) for step in range(0, 200, 5)],
    "sft": [(step, 3.0 - step / 100) for step in range(0, 100, 10)],
}


def _images(page: str, out_dir: Path) -> list[Path]:
    return [out_dir / name for name in re.findall(r'<img src="([^"]+)"', page)]


def _assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert image.format == "PNG" and width > 100 and height > 100


def test_report_shows_the_decision_gates_and_valid_plots(tmp_path: Path) -> None:
    report = _report()
    assert report["passed"] is True
    path = write_report(report, LOSS, tmp_path / "report", bootstrap_samples=200, confidence=0.9)
    assert path == tmp_path / "report" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "PROMOTE: every gate passed" in page
    assert "champion (version 3)" in page
    for gate in report["gates"]:
        assert f"<td>{gate['name']}</td>" in page
        assert f"[{gate['low']:+.4f}, {gate['high']:+.4f}]" in page
    images = _images(page, path.parent)
    assert [p.name for p in images] == [LOSS_CURVES_PNG, BPB_PNG, INSTRUCTIONS_PNG]
    for image in images:
        _assert_valid_png(image)
    # Per-model table: the candidate's domain bits-per-byte as computed from its documents.
    assert f"{report['scores']['candidate']['domain']['bits_per_byte']:.4f} [" in page
    assert "<script" not in page.lower()  # no JavaScript at all


def test_answers_are_escaped(tmp_path: Path) -> None:
    page = write_report(_report(), LOSS, tmp_path).read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "List &lt;b&gt;keys&lt;/b&gt;" in page
    assert "{&quot;a&quot;: 1}" in page


def test_failed_gate_and_first_model_without_champion(tmp_path: Path) -> None:
    report = _report(champion=False, rouge=0.3)
    assert report["reference"] == "base"
    page = write_report(report, LOSS, tmp_path).read_text(encoding="utf-8")
    assert "NOT PROMOTED: failed instruction_rouge_l" in page
    assert '<tr class="fail"><td>instruction_rouge_l</td>' in page
    assert "the base model (no model holds the champion alias yet)" in page
    assert "<th>champion</th>" not in page
    for image in _images(page, tmp_path):
        _assert_valid_png(image)


def test_missing_data_gives_notes_not_broken_images(tmp_path: Path) -> None:
    report = _report(generations=False)
    skipped = {s["name"] for s in report["skipped"]}
    assert skipped == {"instruction_rouge_l", "instruction_exact_match", "instruction_json_valid"}
    page = write_report(report, {}, tmp_path).read_text(encoding="utf-8")
    assert [p.name for p in _images(page, tmp_path)] == [BPB_PNG]
    _assert_valid_png(tmp_path / BPB_PNG)
    assert not (tmp_path / LOSS_CURVES_PNG).exists()
    assert "no loss history was recorded" in page
    assert "no answers were generated (eval.max_generations is 0)" in page
    assert page.count('<tr class="skip">') == 3


@pytest.mark.parametrize("bad", [[], [(0, 1.0)]])
def test_short_loss_curves_still_plot_or_are_left_out(
    tmp_path: Path, bad: list[tuple[int, float]]
) -> None:
    page = write_report(_report(), {"cpt": bad}, tmp_path).read_text(encoding="utf-8")
    assert (LOSS_CURVES_PNG in page) is bool(bad)
    for image in _images(page, tmp_path):
        _assert_valid_png(image)
