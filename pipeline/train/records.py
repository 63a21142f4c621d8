"""What the training loop records per step, keeps across attempts, and reports at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StepRecord:
    """What one optimizer step did, as logged, checkpointed and reported."""

    step: int
    loss: float | None
    """Token-weighted cross-entropy of the step; None when skipped or empty."""
    lr: float
    """Learning rate the step applied (the scheduler moves after it)."""
    grad_norm: float | None
    """Global gradient norm before clipping; None when skipped."""
    target_tokens: int
    tokens_per_s: float
    target_tokens_per_s: float
    step_time_s: float
    skipped: bool
    empty: bool
    """Every label of the step's blocks was masked: nothing to learn, not a failure."""
    data: str
    """Digest of the block indices the step read (all ranks)."""
    aux_loss: float | None = None
    """Router load-balancing loss (before its coefficient); None for dense models."""


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where a checkpoint left off."""

    step: int = 0
    """Optimizer steps done, skipped ones included."""
    samples: int = 0
    """Position in the data order: blocks consumed by all ranks."""
    tokens: int = 0
    """Tokens in the consumed blocks, padding included."""
    target_tokens: int = 0
    """Tokens trained on (labels not masked)."""
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    spike_in_a_row: int = 0
    history: list[StepRecord] = field(default_factory=list)
    """One record per step, skipped ones included."""

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        history = [StepRecord(**record) for record in saved.get("history", [])]
        return cls(**{**saved, "history": history})


def is_loss_spike(earlier: list[float], loss: float, factor: float, min_history: int) -> bool:
    """Whether ``loss`` is above ``factor`` times the mean of the last 100 earlier losses (with
    at least ``min_history`` of them, so warm-up noise does not count)."""
    window = earlier[-100:]
    return len(window) >= min_history and loss > factor * sum(window) / len(window)


def summarize(state: TrainState, attempt: list[StepRecord]) -> dict[str, Any]:
    """Losses over every step of the run (resumed attempts included); speed over ``attempt``,
    the applied steps of this attempt, its first (warm-up) step left out."""
    history = state.history
    losses = [h.loss for h in history if h.loss is not None]
    aux = [h.aux_loss for h in history if h.aux_loss is not None]
    timed = attempt[1:] or attempt

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else 0.0

    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "final_aux_loss": aux[-1] if aux else None,
        "steps": len(history),
        "skipped_steps": state.skipped_steps,
        "grad_norm": history[-1].grad_norm if history else None,
        "tokens_seen": state.tokens,
        "target_tokens_seen": state.target_tokens,
        "step_time_s": mean([r.step_time_s for r in timed]),
        "tokens_per_s": mean([r.tokens_per_s for r in timed]),
        "target_tokens_per_s": mean([r.target_tokens_per_s for r in timed]),
        "loss_history": [None if h.loss is None else round(h.loss, 6) for h in history],
        "aux_loss_history": [h.aux_loss for h in history] if aux else [],
        "lr_history": [h.lr for h in history],
        "data_order": [h.data for h in history],
    }
