"""Promotion gates on bootstrap intervals over fixed, synthetic per-document score tables."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pipeline.config import EvalConfig
from pipeline.eval.gates import bootstrap, decide, gate_table, model_interval

# --- fixed score tables ------------------------------------------------------------------

ALL_PASS = {
    "domain_bpb": True,
    "general_bpb": True,
    "instruction_rouge_l": True,
    "instruction_exact_match": True,
    "instruction_json_valid": True,
}


def _split(nll: np.ndarray, nbytes: np.ndarray) -> dict[str, Any]:
    tokens = nbytes // 4
    return {
        "documents": [
            {"nll": float(a), "tokens": int(t), "bytes": int(b)}
            for a, t, b in zip(nll, tokens, nbytes, strict=True)
        ],
        "bits_per_byte": float(nll.sum() / math.log(2) / nbytes.sum()),
        "loss": float(nll.sum() / tokens.sum()),
        "tokens": int(tokens.sum()),
        "bytes": int(nbytes.sum()),
    }


def _corpus(
    change: dict[str, float], n: int = 64, noise: float = 0.01, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """One split per model over the same ``n`` documents.

    Document i has its own difficulty (0.8 to 1.6 bits per byte, shared by every model); a
    model's nll on it is that times ``1 + change[model] + noise * N(0, 1)``, so ``change`` is
    the model's relative bits-per-byte change (negative: better) and ``noise`` its per-document
    spread.
    """
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(200, 2000, n)
    difficulty = nbytes * math.log(2) * rng.uniform(0.8, 1.6, n)
    return {
        model: _split(difficulty * (1 + c + noise * rng.standard_normal(n)), nbytes)
        for model, c in change.items()
    }


def _instructions(
    means: dict[str, dict[str, float]], n: int = 60, seed: int = 1
) -> dict[str, dict[str, Any]]:
    """Generated examples per model: exact_match and json_valid are Bernoulli(mean), rouge_l is
    mean + N(0, 0.1) clipped to [0, 1]; json_valid is None on odd examples (reference not JSON),
    keywords is None everywhere (no eval.required_keywords)."""
    rng = np.random.default_rng(seed)
    out = {}
    for model, m in means.items():
        examples = [
            {
                "prompt": f"question {i}",
                "reference": f"answer {i}",
                "answer": f"{model} answer {i}",
                "exact_match": float(rng.random() < m["exact_match"]),
                "rouge_l": float(np.clip(m["rouge_l"] + 0.1 * rng.standard_normal(), 0, 1)),
                "json_valid": float(rng.random() < m["json_valid"]) if i % 2 == 0 else None,
                "json_keys": None,
                "keywords": None,
            }
            for i in range(n)
        ]
        out[model] = {"examples": examples}
    return out


GOOD = {"exact_match": 0.5, "rouge_l": 0.6, "json_valid": 0.9}


def _scores(
    domain: dict[str, float] | None = None,
    general: dict[str, float] | None = None,
    instructions: dict[str, dict[str, float]] | None = None,
    champion: bool = True,
    n: int = 64,
    noise: float = 0.01,
) -> dict[str, Any]:
    """Scores of base, cpt, candidate (and champion); by default a candidate 5% better than the
    champion on domain text, unchanged on general text and on instructions."""
    models = ["base", "cpt", "candidate"] + (["champion"] if champion else [])
    domain = {"base": 0.3, "cpt": 0.0, "candidate": -0.05, "champion": 0.0, **(domain or {})}
    general = {m: 0.0 for m in models} | (general or {})
    instr = {m: GOOD for m in models} | (instructions or {})
    splits = {
        "domain": _corpus({m: domain[m] for m in models}, n, noise, seed=0),
        "general": _corpus({m: general[m] for m in models}, n, noise, seed=1),
        "answer_loss": _corpus({m: domain[m] for m in models}, n, noise, seed=2),
        "instructions": _instructions({m: instr[m] for m in models}),
    }
    return {m: {split: per_model[m] for split, per_model in splits.items()} for m in models}


def _verdicts(report: dict[str, Any]) -> dict[str, bool]:
    return {g["name"]: g["passed"] for g in report["gates"]}


def _gate(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in report["gates"] if g["name"] == name)


CFG = EvalConfig(bootstrap_samples=1000, confidence=0.9)

# Pinned at BOOTSTRAP_SEED and the table seeds above.
DOMAIN_EST, DOMAIN_LOW, DOMAIN_HIGH = 0.050128, 0.046608, 0.053824
DOMAIN_DETAIL = (
    "domain bits/byte 1.1751 vs champion 1.2371: improvement +5.01%, 90% interval "
    "[+4.66%, +5.38%] over 64 documents; the low end must be above +0.00%: pass"
)
GENERAL_LOW, GENERAL_HIGH = -0.004980, 0.000415
ROUGE_EST, ROUGE_LOW, ROUGE_HIGH = 0.137904, 0.110428, 0.167070
NOISE_INTERVALS = (-0.052911, 0.060349, -0.014656, 0.068632)
WIDTHS = (0.069850, 0.016097)
JUDGE_INTERVAL = (0.020833, 0.292708)


# --- decisions ---------------------------------------------------------------------------


def test_a_better_candidate_passes_every_gate_with_pinned_intervals() -> None:
    report = decide(_scores(), CFG)
    assert report["reference"] == "champion"
    assert report["passed"] is True
    assert report["skipped"] == []
    assert _verdicts(report) == ALL_PASS
    domain = _gate(report, "domain_bpb")
    assert domain["metric"] == "domain.bits_per_byte"
    assert (domain["estimate"], domain["low"], domain["high"]) == pytest.approx(
        (DOMAIN_EST, DOMAIN_LOW, DOMAIN_HIGH), abs=5e-5
    )
    assert domain["threshold"] == 0.0
    assert domain["margin"] == pytest.approx(domain["low"])
    assert domain["detail"] == DOMAIN_DETAIL
    general = _gate(report, "general_bpb")
    assert (general["low"], general["high"]) == pytest.approx((GENERAL_LOW, GENERAL_HIGH), abs=5e-5)
    assert general["margin"] == pytest.approx(0.02 - general["low"])


def test_the_point_estimate_is_the_token_weighted_bits_per_byte_change() -> None:
    scores = _scores()
    report = decide(scores, CFG)
    cand, champ = scores["candidate"]["domain"], scores["champion"]["domain"]
    improvement = (champ["bits_per_byte"] - cand["bits_per_byte"]) / champ["bits_per_byte"]
    assert _gate(report, "domain_bpb")["estimate"] == pytest.approx(improvement, rel=1e-12)
    assert _gate(report, "domain_bpb")["low"] < improvement < _gate(report, "domain_bpb")["high"]


def test_domain_not_improved_fails_only_the_domain_gate() -> None:
    report = decide(_scores(domain={"candidate": 0.0}), CFG)
    assert report["passed"] is False
    assert _verdicts(report) == ALL_PASS | {"domain_bpb": False}
    domain = _gate(report, "domain_bpb")
    assert domain["low"] < 0.0 < domain["high"]
    assert domain["margin"] == pytest.approx(domain["low"]) and domain["margin"] < 0
    assert domain["detail"].endswith(": FAIL")


def test_general_regression_fails_only_the_general_gate() -> None:
    report = decide(_scores(general={"candidate": 0.05}), CFG)
    assert _verdicts(report) == ALL_PASS | {"general_bpb": False}
    general = _gate(report, "general_bpb")
    assert general["estimate"] == pytest.approx(0.05, abs=0.005)
    assert general["low"] > 0.02
    assert general["margin"] < 0
    assert report["passed"] is False


def test_rouge_l_drop_fails_only_the_rouge_l_gate() -> None:
    report = decide(_scores(instructions={"candidate": GOOD | {"rouge_l": 0.45}}), CFG)
    assert _verdicts(report) == ALL_PASS | {"instruction_rouge_l": False}
    rouge = _gate(report, "instruction_rouge_l")
    assert rouge["metric"] == "instructions.rouge_l"
    assert (rouge["estimate"], rouge["low"], rouge["high"]) == pytest.approx(
        (ROUGE_EST, ROUGE_LOW, ROUGE_HIGH), abs=5e-5
    )


def test_json_valid_drop_fails_only_the_json_valid_gate() -> None:
    report = decide(_scores(instructions={"candidate": GOOD | {"json_valid": 0.4}}), CFG)
    assert _verdicts(report) == ALL_PASS | {"instruction_json_valid": False}
    gate = _gate(report, "instruction_json_valid")
    assert "over 30 examples" in gate["detail"]  # None (non-JSON references) are skipped


def test_first_model_without_champion_is_gated_against_base() -> None:
    # The first model ever trained is 5% worse than base on domain text: it must not become
    # champion just because there is no champion to lose to.
    scores = _scores(domain={"base": 0.0, "candidate": 0.05}, champion=False)
    report = decide(scores, CFG)
    assert report["reference"] == "base"
    assert _verdicts(report) == ALL_PASS | {"domain_bpb": False}
    assert "vs base" in _gate(report, "domain_bpb")["detail"]
    better = decide(_scores(champion=False), CFG)  # base is 30% worse than the candidate
    assert better["reference"] == "base" and better["passed"] is True
    assert _gate(better, "domain_bpb")["estimate"] == pytest.approx(1 - 0.95 / 1.3, abs=0.005)


def test_noise_neither_promotes_nor_blocks() -> None:
    # Small mean changes under 15% per-document spread: the domain improvement estimate is
    # positive and the general regression estimate is above the 2% allowance, but both
    # intervals straddle their thresholds, so the domain gate must not pass and the general
    # gate must not fail.
    scores = _scores(domain={"candidate": -0.003}, general={"candidate": 0.06}, noise=0.15)
    report = decide(scores, CFG)
    domain, general = _gate(report, "domain_bpb"), _gate(report, "general_bpb")
    assert domain["estimate"] > 0.0 and domain["low"] < 0.0 < domain["high"]
    assert domain["passed"] is False
    assert general["estimate"] > 0.02 and general["low"] < 0.02 < general["high"]
    assert general["passed"] is True
    assert (domain["low"], domain["high"], general["low"], general["high"]) == pytest.approx(
        NOISE_INTERVALS, abs=5e-5
    )


def test_a_copy_of_the_reference_is_not_promoted() -> None:
    # Identical scores give the interval [0, 0]: the domain gate needs its low end strictly
    # above min_improvement, the other gates fail only strictly above their allowance.
    scores = _scores()
    scores["candidate"] = scores["champion"]
    report = decide(scores, CFG)
    assert _verdicts(report) == ALL_PASS | {"domain_bpb": False}
    for gate in report["gates"]:
        assert (gate["estimate"], gate["low"], gate["high"]) == (0.0, 0.0, 0.0)


def test_min_improvement_is_compared_with_the_low_end() -> None:
    low = _gate(decide(_scores(), CFG), "domain_bpb")["low"]
    above = decide(_scores(), CFG.model_copy(update={"min_improvement": low - 1e-6}))
    below = decide(_scores(), CFG.model_copy(update={"min_improvement": low + 1e-6}))
    assert _verdicts(above)["domain_bpb"] is True
    assert _verdicts(below)["domain_bpb"] is False


def test_interval_shrinks_with_more_documents() -> None:
    def width(n: int) -> float:
        gate = _gate(decide(_scores(n=n, noise=0.05), CFG), "domain_bpb")
        return float(gate["high"] - gate["low"])

    narrow, wide = width(256), width(16)
    assert narrow < wide / 2.5  # ~1/sqrt(16 / 256) = 1/4 in expectation
    assert (wide, narrow) == pytest.approx(WIDTHS, abs=5e-5)


def test_gates_without_data_are_skipped_with_a_note() -> None:
    cfg = CFG.model_copy(update={"max_instruction_regression": {"keywords": 0.0, "rouge_l": 0.02}})
    report = decide(_scores(), cfg)
    assert _verdicts(report) == {
        "domain_bpb": True,
        "general_bpb": True,
        "instruction_rouge_l": True,
    }
    assert report["skipped"] == [
        {
            "name": "instruction_keywords",
            "metric": "instructions.keywords",
            "detail": "no generated example has keywords for both the candidate and the champion",
        }
    ]
    assert report["passed"] is True


def test_judge_win_rate_gate() -> None:
    cfg = CFG.model_copy(update={"max_instruction_regression": {"judge_win_rate": 0.1}})
    assert decide(_scores(), cfg)["skipped"][0]["name"] == "instruction_judge_win_rate"
    wins = [1.0] * 6 + [0.5] * 4 + [0.0] * 14  # win rate 1/3: shortfall 0.1667 from a tie
    scores = _scores()
    scores["candidate"]["judge"] = {"examples": [{"win": w} for w in wins], "win_rate": 1 / 3}
    gate = _gate(decide(scores, cfg), "instruction_judge_win_rate")
    assert gate["metric"] == "judge.win_rate"
    assert gate["estimate"] == pytest.approx(0.5 - 1 / 3)
    assert (gate["low"], gate["high"]) == pytest.approx(JUDGE_INTERVAL, abs=5e-5)
    assert gate["passed"] is True  # the shortfall is likely, but not certainly above 0.1
    scores["candidate"]["judge"]["examples"] = [{"win": w} for w in [0.0] * 20 + [1.0] * 4]
    gate = _gate(decide(scores, cfg), "instruction_judge_win_rate")
    assert gate["estimate"] == pytest.approx(0.5 - 4 / 24)
    assert gate["low"] > 0.1 and gate["passed"] is False


def test_misaligned_documents_and_prompts_are_refused() -> None:
    scores = _scores()
    scores["candidate"]["domain"]["documents"][3]["bytes"] += 1
    with pytest.raises(ValueError, match=r"domain documents of the candidate .* not the same"):
        decide(scores, CFG)
    scores = _scores()
    scores["champion"]["instructions"]["examples"].pop()
    with pytest.raises(ValueError, match="same prompts"):
        decide(scores, CFG)
    # Unknown metric names never reach the gates: the config refuses them (test_config).
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        type(CFG).model_validate({**CFG.model_dump(), "max_instruction_regression": {"bleu": 0.1}})


# --- intervals and the log table ----------------------------------------------------------


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    values = np.random.default_rng(3).normal(10.0, 2.0, 400)
    iv = bootstrap(lambda rows: values[rows].mean(axis=-1), 400, samples=2000, confidence=0.9)
    half_width = 1.6449 * values.std() / math.sqrt(400)
    assert iv.estimate == pytest.approx(values.mean())
    assert (iv.high - iv.low) / 2 == pytest.approx(half_width, rel=0.1)
    assert iv.n == 400


def test_model_interval_over_a_models_own_documents() -> None:
    scores = _scores()
    iv = model_interval(scores["candidate"], "domain.bits_per_byte", 1000, 0.9)
    assert iv is not None
    assert iv.estimate == pytest.approx(scores["candidate"]["domain"]["bits_per_byte"])
    assert iv.low < iv.estimate < iv.high and iv.n == 64
    rouge = model_interval(scores["candidate"], "instructions.rouge_l", 1000, 0.9)
    assert rouge is not None and rouge.n == 60
    json_valid = model_interval(scores["candidate"], "instructions.json_valid", 1000, 0.9)
    assert json_valid is not None and json_valid.n == 30
    assert model_interval(scores["candidate"], "instructions.keywords", 1000, 0.9) is None
    assert model_interval(scores["candidate"], "judge.win_rate", 1000, 0.9) is None
    with pytest.raises(ValueError, match=r"no interval for metric 'domain\.loss'"):
        model_interval(scores["candidate"], "domain.loss", 1000, 0.9)


def test_gate_table_is_aligned() -> None:
    gates = [
        {
            "name": "domain_bpb",
            "passed": True,
            "estimate": 0.05,
            "low": 0.0466,
            "high": 0.0538,
            "threshold": 0.0,
            "margin": 0.0466,
        },
        {
            "name": "instruction_rouge_l",
            "passed": False,
            "estimate": 0.15,
            "low": 0.125,
            "high": 0.175,
            "threshold": 0.02,
            "margin": -0.105,
        },
    ]
    skipped = [{"name": "instruction_keywords", "detail": "no data"}]
    assert gate_table(gates, skipped) == [
        "gate                 result  estimate  interval            threshold  margin",
        "-------------------  ------  --------  ------------------  ---------  -------",
        "domain_bpb           pass    +0.0500   [+0.0466, +0.0538]  +0.0000    +0.0466",
        "instruction_rouge_l  FAIL    +0.1500   [+0.1250, +0.1750]  +0.0200    -0.1050",
        "instruction_keywords  skipped: no data",
    ]


def test_general_gate_is_skipped_against_a_randomly_initialised_base() -> None:
    # A model trained from scratch on domain text is worse on general text than uniform
    # guessing; against a random base that is no forgetting, against a champion it is.
    scores = _scores(general={"candidate": 0.05}, champion=False)
    scratch = decide(scores, CFG, base_pretrained=False)
    assert "general_bpb" not in _verdicts(scratch)
    assert [s["name"] for s in scratch["skipped"]] == ["general_bpb"]
    assert scratch["passed"] is True
    assert decide(scores, CFG, base_pretrained=True)["passed"] is False
    with_champion = decide(_scores(general={"candidate": 0.05}), CFG, base_pretrained=False)
    assert _verdicts(with_champion)["general_bpb"] is False
