"""Decontamination: training records must share no run of ``n`` tokens with the evaluation
data (``data.eval_sets``, and the held-out split with ``data.decontaminate_heldout``)."""

from __future__ import annotations

import numpy as np

from pipeline.data import dedup


class Decontaminator:
    """Flags records sharing a run of ``n`` tokens with the evaluation data."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.parts: list[np.ndarray] = []
        self.banned = np.zeros(0, dtype=np.uint64)

    def add_eval(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if self.n is not None and len(ids[mask]) >= self.n:
            self.parts.append(dedup.ngram_hashes(ids[mask], self.n))

    def freeze(self) -> None:
        if self.parts:
            self.banned = np.unique(np.concatenate(self.parts))
        self.parts = []

    def contaminated(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        if self.n is None or not len(self.banned) or len(ids[mask]) < self.n:
            return False
        hashes = dedup.ngram_hashes(ids[mask], self.n)
        at = np.minimum(np.searchsorted(self.banned, hashes), len(self.banned) - 1)
        return bool((self.banned[at] == hashes).any())
