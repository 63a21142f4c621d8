"""Promotion gates: the candidate must beat the base model and not lose to the champion."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import EvalConfig


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


def _bpb(scores: dict[str, Any], model: str, split: str) -> float:
    value: float = scores[model][split]["bits_per_byte"]
    return value


def evaluate_gates(scores: dict[str, Any], cfg: EvalConfig) -> list[Gate]:
    """Gates over held-out bits-per-byte (lower is better), comparable across tokenizers.

    Args:
        scores: ``{"base"|"candidate"|"champion": {"domain"|"instructions": {...}}}``;
            ``champion`` is absent when no model holds the alias yet.
    """
    cand_instr, base_instr = (
        _bpb(scores, "candidate", "instructions"),
        _bpb(scores, "base", "instructions"),
    )
    gates = [
        Gate(
            "beats_base_on_instructions",
            cand_instr < base_instr,
            f"candidate {cand_instr:.4f} vs base {base_instr:.4f} bits/byte",
        )
    ]
    if "champion" not in scores:
        gates.append(Gate("no_champion_yet", True, "no model holds the champion alias"))
        return gates
    champ_instr = _bpb(scores, "champion", "instructions")
    improvement = (champ_instr - cand_instr) / champ_instr
    gates.append(
        Gate(
            "beats_champion_on_instructions",
            improvement > 0 and improvement >= cfg.min_improvement,
            f"improvement {improvement:+.2%} (needs > 0 and >= {cfg.min_improvement:.2%})",
        )
    )
    cand_dom, champ_dom = _bpb(scores, "candidate", "domain"), _bpb(scores, "champion", "domain")
    regression = (cand_dom - champ_dom) / champ_dom
    gates.append(
        Gate(
            "domain_within_regression",
            regression <= cfg.max_domain_regression,
            f"domain change {regression:+.2%} (allowed <= {cfg.max_domain_regression:.2%})",
        )
    )
    return gates


def gates_report(gates: list[Gate]) -> dict[str, Any]:
    return {"passed": all(g.passed for g in gates), "gates": [asdict(g) for g in gates]}
