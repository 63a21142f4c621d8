"""The order in which training reads packed blocks, addressable by position.

Training reads one endless stream of block indices: epoch ``e`` is a permutation of all blocks
seeded by ``(seed, e)``, and epochs follow each other. Item ``p`` of the stream is
``permutation(p // n)[p % n]``, so a resumed run jumps straight to the position stored in its
checkpoint: nothing is replayed, nothing is read twice or skipped, and the cost of resuming
does not grow with the number of steps already done.

Within an optimizer step, micro-batch ``m`` of rank ``r`` covers
``[start + (m * world + r) * micro, ... + micro)``: every micro-batch slot is one contiguous
slice of the stream shared by all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DataOrder:
    n_blocks: int
    seed: int
    _epoch: int = field(default=-1, init=False, repr=False)
    _perm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), init=False, repr=False)
    permutations_built: int = field(default=0, init=False)
    """How many epoch permutations were computed (a resume builds one, not one per epoch)."""

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError("the training split has no blocks; check prepare_data's manifest")

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._epoch = epoch
            self.permutations_built += 1
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Block indices at stream positions ``[start, start + count)``."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.n_blocks)
            take = min(count - filled, self.n_blocks - offset)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def micro_batch(self, start: int, micro: int, m: int, rank: int, world: int) -> np.ndarray:
        """Indices of micro-batch ``m`` of ``rank`` in the step that begins at ``start``."""
        return self.indices(start + (m * world + rank) * micro, micro)
