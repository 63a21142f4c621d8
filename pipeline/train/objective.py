"""What one micro-batch contributes to a step's loss, computed without full fp32 logits.

``TrainingObjective`` wraps the Hugging Face causal LM for DeepSpeed: its forward runs the
decoder to its last hidden states and returns two sums, the next-token cross-entropy summed
over the micro-batch's target tokens and, for mixture-of-experts models, the router's
load-balancing loss summed over its real (non-padding) tokens. The loop divides both by the
step's global counts, so every token weighs the same however the step is split.

Only the rows whose next token is a target reach the LM head (SFT prompts and padding cost no
logits at all); how those rows become a loss is ``compute.cross_entropy``:

- ``full``: one LM-head matmul over every position, then cross-entropy (the reference);
- ``chunked``: the LM head and the loss run ``loss_chunk_tokens`` positions at a time, each
  chunk recomputed in backward, so at most one chunk of logits exists at once;
- ``fused``: liger-kernel's fused linear cross-entropy (CUDA; it reads the whole LM head
  weight, so ZeRO 0-2 only).

Under ZeRO-3 every rank must call the same modules in the same order (each call gathers the
module's partitioned weights in a collective). The chunked loss therefore calls the LM head
once per chunk of *positions*, a number fixed by the micro-batch shape, whatever the number of
targets in a chunk (a chunk without targets scores one row against the ignore index).
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def resolve_cross_entropy(requested: str, device_type: str, zero_stage: int) -> str:
    """``compute.cross_entropy`` as it will run: ``auto`` is ``fused`` where liger-kernel can run
    (CUDA, installed, ZeRO 0-2), else ``chunked``.

    Raises:
        ValueError: ``fused`` was requested where it cannot run.
    """
    fused_ok = (
        device_type == "cuda"
        and zero_stage < 3
        and importlib.util.find_spec("liger_kernel") is not None
    )
    if requested == "auto":
        return "fused" if fused_ok else "chunked"
    if requested == "fused" and not fused_ok:
        raise ValueError(
            "compute.cross_entropy=fused needs CUDA, zero_stage 0-2 and the liger-kernel package "
            "(in the GPU image); use 'chunked' or 'auto' here"
        )
    return requested


@dataclass(frozen=True)
class LossRows:
    """Which hidden-state rows of a ``[B, S]`` micro-batch predict a target, computed on the
    host from the labels (no device sync), and the chunk boundaries over them."""

    index: np.ndarray
    """Flat positions ``b * S + s`` whose next token ``labels[b, s + 1]`` is a target."""
    targets: np.ndarray
    """The target token of each row of ``index``."""
    chunk_offsets: list[int]
    """Row offsets into ``index`` where each chunk of ``chunk_positions`` positions starts, and
    the end: chunk ``c`` is ``index[offsets[c]:offsets[c + 1]]`` (possibly empty)."""
    real_tokens: np.ndarray
    """``[B * S]`` 1.0 where a token is part of a document, 0.0 on padding (router loss)."""

    @property
    def n_targets(self) -> int:
        return int(self.index.size)

    @property
    def n_real(self) -> int:
        return int(self.real_tokens.sum())


def loss_rows(
    labels: np.ndarray, input_ids: np.ndarray, pad_id: int | None, chunk_positions: int
) -> LossRows:
    """The rows of a micro-batch that the loss reads (see ``LossRows``)."""
    batch, seq = labels.shape
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
    index = (rows * seq + cols).astype(np.int64)
    bounds = np.arange(0, batch * seq + chunk_positions, chunk_positions)
    offsets = np.searchsorted(index, np.minimum(bounds, batch * seq))
    real = (input_ids != pad_id) if pad_id is not None else np.ones_like(input_ids, dtype=bool)
    return LossRows(
        index=index,
        targets=labels[rows, cols + 1].astype(np.int64),
        chunk_offsets=[int(o) for o in offsets],
        real_tokens=real.reshape(-1).astype(np.float32),
    )


def router_aux_coefficient(model_config: Any) -> float | None:
    """The model's load-balancing loss coefficient (Mixtral, Qwen MoE), None for dense models."""
    experts = getattr(model_config, "num_local_experts", None) or getattr(
        model_config, "num_experts", None
    )
    coef = getattr(model_config, "router_aux_loss_coef", None)
    return float(coef) if experts and coef is not None else None


def make_objective(model: Any, cross_entropy: str, chunk_positions: int) -> Any:
    """``TrainingObjective`` around ``model`` (defined lazily: this module imports without torch)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: Any) -> torch.Tensor:
        return F.cross_entropy(
            head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )

    class TrainingObjective(torch.nn.Module):
        """The causal LM plus its loss; ``model.`` prefixes the LM's parameter names."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.cross_entropy = cross_entropy
            self.aux_coef = router_aux_coefficient(model.config)

        def forward(
            self,
            rows: LossRows,
            index: torch.Tensor,
            targets: torch.Tensor,
            real_tokens: torch.Tensor,
            **decoder_inputs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Returns (cross-entropy summed over target tokens, router loss x real tokens)."""
            extra = {"output_router_logits": True} if self.aux_coef is not None else {}
            out = self.model.get_decoder()(**decoder_inputs, **extra)
            hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            head = self.model.get_output_embeddings()
            ce = self._cross_entropy(hidden, head, rows, index, targets)
            if self.aux_coef is None:
                return ce, ce.new_zeros(())
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            config = self.model.config
            experts = getattr(config, "num_local_experts", None) or config.num_experts
            aux = load_balancing_loss_func(
                out.router_logits, experts, config.num_experts_per_tok, real_tokens
            )
            # The function averages over this micro-batch's real tokens: back to a sum, so the
            # loop's division by the step's global count weighs every token the same.
            return ce, torch.as_tensor(aux) * float(rows.n_real)

        def _cross_entropy(
            self,
            hidden: torch.Tensor,
            head: Any,
            rows: LossRows,
            index: torch.Tensor,
            targets: torch.Tensor,
        ) -> torch.Tensor:
            if self.cross_entropy == "full":
                logits = head(hidden).float()  # every position, as a plain LM forward would
                return F.cross_entropy(
                    logits.index_select(0, index),
                    targets,
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            selected = hidden.index_select(0, index)
            if self.cross_entropy == "fused" and rows.n_targets:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
                    head.weight, selected, targets
                )
                return (loss[0] if isinstance(loss, tuple) else loss).float()
            total = hidden.new_zeros((), dtype=torch.float32)
            # fused without targets falls through to one ignored row: still a graph to backward.
            offsets = rows.chunk_offsets if self.cross_entropy == "chunked" else [0, 0]
            for start, end in itertools.pairwise(offsets):
                if end > start:
                    part, part_targets = selected[start:end], targets[start:end]
                else:  # no target here: one ignored row keeps the LM-head calls per step fixed
                    part = hidden[:1]
                    part_targets = targets.new_full((1,), IGNORE_INDEX)
                total = total + checkpoint(
                    chunk_loss, part, part_targets, head, use_reentrant=False
                )
            return total

    return TrainingObjective()
