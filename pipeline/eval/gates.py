"""Promotion gates decided on bootstrap confidence intervals, not on point estimates.

The candidate is gated against the champion, or against the base model while no model holds
the champion alias. Every model is scored on the same held-out documents and chats (document
``i`` is the same text for every model), so each gate resamples document / example indices once
and applies them to both models: a paired bootstrap, which cancels the document-to-document
variance the two models share.

Decision rules (``low`` is the lower end of the two-sided ``eval.confidence`` interval):

- ``domain_bpb``: relative improvement in domain bits-per-byte; passes when
  ``low > eval.min_improvement``. Strictly above: with the default ``min_improvement: 0`` a
  candidate identical to its reference (interval ``[0, 0]``) is not promoted; it must be better
  with confidence.
- ``general_bpb``: relative regression in general bits-per-byte; fails only when
  ``low > eval.max_general_regression`` (a regression beyond the allowance is certain), so noise
  alone never fails it.
- ``instruction_<metric>``: absolute drop of an instruction metric (and ``judge_win_rate``:
  ``0.5 - win rate`` against the champion); fails only when ``low > allowed drop``.

``margin`` is the signed distance of the deciding interval end from the threshold, positive
on the passing side. Everything here is a pure function of the scores; nothing is read or
written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config import EvalConfig
from pipeline.contract import BPB_CORPORA, INSTRUCTION_METRICS, JUDGE_METRIC

BOOTSTRAP_SEED = 20251130
"""Seed of every bootstrap: the same scores always give the same intervals, and a gate's
interval does not depend on which other gates ran before it."""


Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps index rows of shape ``(resamples, n)`` to one statistic per row."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval over ``n`` documents/examples."""

    estimate: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Gate:
    """One gate's decision; ``as_dict`` is the contract's gate record in ``eval_report.json``."""

    name: str
    metric: str
    passed: bool
    estimate: float
    low: float
    high: float
    threshold: float
    margin: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedGate:
    """A configured gate that could not be decided (no data for it), with the reason."""

    name: str
    metric: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap(
    statistic: Statistic, n: int, samples: int, confidence: float, seed: int = BOOTSTRAP_SEED
) -> Interval:
    """Percentile bootstrap of ``statistic`` over ``n`` items.

    Args:
        statistic: maps an index array ``(rows, n)`` to one value per row; the estimate is the
            statistic on the identity row ``0..n-1``.
        n: number of documents / examples (at least 1).
        samples: bootstrap resamples.
        confidence: two-sided level; the interval spans the ``(1 - c) / 2`` and
            ``(1 + c) / 2`` quantiles of the resampled statistic.
        seed: numpy RNG seed.

    Returns:
        The estimate and the interval.
    """
    assert n >= 1, "bootstrap over no items"
    estimate = float(statistic(np.arange(n)[None, :])[0])
    rows = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    values = statistic(rows)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), n)


# --- reading the scores ---------------------------------------------------------------------


def _documents(model_scores: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-document summed nll (nats) and UTF-8 byte counts of one split."""
    docs = model_scores.get(split, {}).get("documents", [])
    nll = np.asarray([d["nll"] for d in docs], dtype=np.float64)
    nbytes = np.asarray([d["bytes"] for d in docs], dtype=np.float64)
    return nll, nbytes


def _aligned_documents(
    candidate: dict[str, Any], reference: dict[str, Any], split: str, ref_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(candidate nll, reference nll, bytes)``; refuses documents that are not the same texts."""
    cand_nll, cand_bytes = _documents(candidate, split)
    ref_nll, ref_bytes = _documents(reference, split)
    if len(cand_nll) == 0:
        raise ValueError(
            f"no {split} documents were scored for the candidate; the {split} gate needs "
            "eval.max_documents >= 1 and a non-empty held-out set"
        )
    if len(cand_nll) != len(ref_nll) or not np.array_equal(cand_bytes, ref_bytes):
        raise ValueError(
            f"{split} documents of the candidate ({len(cand_nll)} docs, {int(cand_bytes.sum())} "
            f"bytes) and the {ref_name} ({len(ref_nll)} docs, {int(ref_bytes.sum())} bytes) are "
            "not the same texts; every model must be scored on the same fixed document sample"
        )
    if ref_nll.sum() <= 0 or cand_bytes.sum() <= 0:
        raise ValueError(f"{split} scores of the {ref_name} have no loss or no bytes")
    return cand_nll, ref_nll, cand_bytes


def _relative_change(cand_nll: np.ndarray, ref_nll: np.ndarray) -> Statistic:
    """(cand_bpb - ref_bpb) / ref_bpb on token-weighted totals of the resampled documents.

    The documents' bytes are the same for both models, so the ratio of bits-per-byte is the
    ratio of summed nll; ln 2 and the bytes cancel.
    """

    def statistic(rows: np.ndarray) -> np.ndarray:
        ref = ref_nll[rows].sum(axis=-1)
        result: np.ndarray = (cand_nll[rows].sum(axis=-1) - ref) / ref
        return result

    return statistic


def _bpb(nll: np.ndarray, nbytes: np.ndarray) -> float:
    return float(nll.sum() / np.log(2.0) / nbytes.sum())


def _paired_metric(
    candidate: dict[str, Any], reference: dict[str, Any], metric: str, ref_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate and reference values of ``metric`` on the examples where both have one."""
    cand = candidate.get("instructions", {}).get("examples", [])
    ref = reference.get("instructions", {}).get("examples", [])
    if len(cand) != len(ref) or any(
        c["prompt"] != r["prompt"] for c, r in zip(cand, ref, strict=False)
    ):
        raise ValueError(
            f"generated examples of the candidate ({len(cand)}) and the {ref_name} ({len(ref)}) "
            "are not the same prompts; every model must answer the same held-out chats"
        )
    pairs = [
        (c[metric], r[metric])
        for c, r in zip(cand, ref, strict=True)
        if c.get(metric) is not None and r.get(metric) is not None
    ]
    values = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return values[:, 0], values[:, 1]


# --- the gates -------------------------------------------------------------------------------


def domain_gate(
    candidate: dict[str, Any], reference: dict[str, Any], ref_name: str, cfg: EvalConfig
) -> Gate:
    """Relative improvement in domain bits-per-byte; passes when the interval's low end is
    strictly above ``eval.min_improvement``."""
    cand_nll, ref_nll, nbytes = _aligned_documents(candidate, reference, "domain", ref_name)
    change = _relative_change(cand_nll, ref_nll)
    iv = bootstrap(lambda rows: -change(rows), len(nbytes), cfg.bootstrap_samples, cfg.confidence)
    threshold = cfg.min_improvement
    passed = iv.low > threshold
    detail = (
        f"domain bits/byte {_bpb(cand_nll, nbytes):.4f} vs {ref_name} {_bpb(ref_nll, nbytes):.4f}: "
        f"improvement {iv.estimate:+.2%}, {cfg.confidence:.0%} interval [{iv.low:+.2%}, "
        f"{iv.high:+.2%}] over {iv.n} documents; the low end must be above {threshold:+.2%}"
    )
    return _gate(
        "domain_bpb", "domain.bits_per_byte", passed, iv, threshold, iv.low - threshold, detail
    )


def general_gate(
    candidate: dict[str, Any], reference: dict[str, Any], ref_name: str, cfg: EvalConfig
) -> Gate:
    """Relative regression in general bits-per-byte; fails only when the interval's low end is
    above ``eval.max_general_regression``."""
    cand_nll, ref_nll, nbytes = _aligned_documents(candidate, reference, "general", ref_name)
    iv = bootstrap(
        _relative_change(cand_nll, ref_nll), len(nbytes), cfg.bootstrap_samples, cfg.confidence
    )
    threshold = cfg.max_general_regression
    passed = iv.low <= threshold
    detail = (
        f"general bits/byte {_bpb(cand_nll, nbytes):.4f} vs {ref_name} "
        f"{_bpb(ref_nll, nbytes):.4f}: regression {iv.estimate:+.2%}, {cfg.confidence:.0%} "
        f"interval [{iv.low:+.2%}, {iv.high:+.2%}] over {iv.n} documents; fails when the low "
        f"end is above {threshold:+.2%}"
    )
    return _gate(
        "general_bpb", "general.bits_per_byte", passed, iv, threshold, threshold - iv.low, detail
    )


def instruction_gate(
    candidate: dict[str, Any],
    reference: dict[str, Any],
    ref_name: str,
    metric: str,
    allowed_drop: float,
    cfg: EvalConfig,
) -> Gate | SkippedGate:
    """Absolute drop ``reference - candidate`` of an instruction metric, paired over examples;
    fails only when the interval's low end is above ``allowed_drop``."""
    name = f"instruction_{metric}"
    cand, ref = _paired_metric(candidate, reference, metric, ref_name)
    if len(cand) == 0:
        return SkippedGate(
            name,
            f"instructions.{metric}",
            f"no generated example has {metric} for both the candidate and the {ref_name}",
        )
    drop = ref - cand

    def statistic(rows: np.ndarray) -> np.ndarray:
        result: np.ndarray = drop[rows].mean(axis=-1)
        return result

    iv = bootstrap(statistic, len(drop), cfg.bootstrap_samples, cfg.confidence)
    detail = (
        f"{metric} {cand.mean():.4f} vs {ref_name} {ref.mean():.4f}: drop {iv.estimate:+.4f}, "
        f"{cfg.confidence:.0%} interval [{iv.low:+.4f}, {iv.high:+.4f}] over {iv.n} examples; "
        f"fails when the low end is above {allowed_drop:+.4f}"
    )
    passed = iv.low <= allowed_drop
    return _gate(
        name, f"instructions.{metric}", passed, iv, allowed_drop, allowed_drop - iv.low, detail
    )


def judge_gate(
    candidate: dict[str, Any], allowed_drop: float, cfg: EvalConfig
) -> Gate | SkippedGate:
    """``0.5 - win rate`` of the candidate against the champion by the LLM judge; fails only when
    the interval's low end is above ``allowed_drop``."""
    name, metric = f"instruction_{JUDGE_METRIC}", "judge.win_rate"
    examples = candidate.get("judge", {}).get("examples", [])
    if not examples:
        return SkippedGate(name, metric, "no judge verdicts (no eval.judge or no champion)")
    wins = np.asarray([e["win"] for e in examples], dtype=np.float64)

    def statistic(rows: np.ndarray) -> np.ndarray:
        result: np.ndarray = 0.5 - wins[rows].mean(axis=-1)
        return result

    iv = bootstrap(statistic, len(wins), cfg.bootstrap_samples, cfg.confidence)
    detail = (
        f"judge win rate {wins.mean():.3f} against the champion: shortfall from 0.5 "
        f"{iv.estimate:+.3f}, {cfg.confidence:.0%} interval [{iv.low:+.3f}, {iv.high:+.3f}] over "
        f"{iv.n} judged examples; fails when the low end is above {allowed_drop:+.3f}"
    )
    passed = iv.low <= allowed_drop
    return _gate(name, metric, passed, iv, allowed_drop, allowed_drop - iv.low, detail)


def _gate(
    name: str, metric: str, passed: bool, iv: Interval, threshold: float, margin: float, detail: str
) -> Gate:
    verdict = "pass" if passed else "FAIL"
    return Gate(
        name,
        metric,
        bool(passed),
        iv.estimate,
        iv.low,
        iv.high,
        threshold,
        margin,
        f"{detail}: {verdict}",
    )


def decide(scores: dict[str, Any], cfg: EvalConfig, base_pretrained: bool = True) -> dict[str, Any]:
    """Decide every configured gate for ``scores["candidate"]``.

    Args:
        scores: ``{"base"|"cpt"|"candidate"|"champion": ModelScores}`` (the eval contract);
            ``champion`` is absent while no model holds the alias, and the candidate is then
            gated against ``base``.
        cfg: the ``eval`` config section (thresholds, bootstrap_samples, confidence).
        base_pretrained: False when the base is a random initialisation (no ``model.base``):
            it has no general capability to lose, so the general gate is skipped while the
            candidate is gated against it.

    Returns:
        ``{"reference": "champion"|"base", "passed": bool, "gates": [gate dict, ...],
        "skipped": [{"name", "metric", "detail"}, ...]}``; ``passed`` is true when every decided
        gate passes. A configured instruction gate with no data is skipped (listed, not failed).

    Raises:
        ValueError: models that were not scored on the same documents / prompts (unknown
            metric names never get here: the config refuses them).
    """
    ref_name = "champion" if "champion" in scores else "base"
    candidate, reference = scores["candidate"], scores[ref_name]
    results: list[Gate | SkippedGate] = [domain_gate(candidate, reference, ref_name, cfg)]
    if ref_name == "base" and not base_pretrained:
        results.append(
            SkippedGate(
                "general_bpb",
                "general.bits_per_byte",
                "the base is a random initialisation: no general capability to regress from",
            )
        )
    else:
        results.append(general_gate(candidate, reference, ref_name, cfg))
    for metric, allowed in cfg.max_instruction_regression.items():
        if metric == JUDGE_METRIC:
            results.append(judge_gate(candidate, allowed, cfg))
        else:
            results.append(instruction_gate(candidate, reference, ref_name, metric, allowed, cfg))
    gates = [r for r in results if isinstance(r, Gate)]
    return {
        "reference": ref_name,
        "passed": all(g.passed for g in gates),
        "gates": [g.as_dict() for g in gates],
        "skipped": [r.as_dict() for r in results if isinstance(r, SkippedGate)],
    }


# --- per-model intervals and the log table ---------------------------------------------------


def model_interval(
    model_scores: dict[str, Any], metric: str, samples: int, confidence: float
) -> Interval | None:
    """Bootstrap interval of one model's own score, over its own documents / examples.

    Args:
        model_scores: one model's ``ModelScores``.
        metric: ``"<split>.bits_per_byte"`` for a split in ``BPB_CORPORA``,
            ``"instructions.<metric>"`` for a metric in ``INSTRUCTION_METRICS``, or
            ``"judge.win_rate"``.
        samples: bootstrap resamples.
        confidence: two-sided level.

    Returns:
        The interval, or ``None`` when the model has no data for the metric.
    """
    split, _, name = metric.partition(".")
    if split in BPB_CORPORA and name == "bits_per_byte":
        nll, nbytes = _documents(model_scores, split)
        if len(nll) == 0:
            return None
        bpb = nll / np.log(2.0)

        def statistic(rows: np.ndarray) -> np.ndarray:
            result: np.ndarray = bpb[rows].sum(axis=-1) / nbytes[rows].sum(axis=-1)
            return result

        return bootstrap(statistic, len(nll), samples, confidence)
    if split == "instructions" and name in INSTRUCTION_METRICS:
        examples = model_scores.get("instructions", {}).get("examples", [])
        values = np.asarray([e[name] for e in examples if e.get(name) is not None], dtype=float)
    elif metric == "judge.win_rate":
        values = np.asarray([e["win"] for e in model_scores.get("judge", {}).get("examples", [])])
    else:
        raise ValueError(f"no interval for metric {metric!r}; see model_interval's docstring")
    if len(values) == 0:
        return None

    def mean(rows: np.ndarray) -> np.ndarray:
        result: np.ndarray = values[rows].mean(axis=-1)
        return result

    return bootstrap(mean, len(values), samples, confidence)


def gate_table(
    gates: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]] = ()
) -> list[str]:
    """Aligned plain-text lines (header, rule, one per gate, then skipped gates) for task logs.

    Args:
        gates: gate dicts as in ``decide(...)["gates"]``.
        skipped: ``decide(...)["skipped"]``.
    """
    header = ("gate", "result", "estimate", "interval", "threshold", "margin")
    rows = [
        (
            g["name"],
            "pass" if g["passed"] else "FAIL",
            f"{g['estimate']:+.4f}",
            f"[{g['low']:+.4f}, {g['high']:+.4f}]",
            f"{g['threshold']:+.4f}",
            f"{g['margin']:+.4f}",
        )
        for g in gates
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    lines += [f"{s['name']}  skipped: {s['detail']}" for s in skipped]
    return lines
