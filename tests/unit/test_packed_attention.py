"""Packed blocks are document-isolated: position-id restarts stand in for an attention mask.

The training loop and the evaluator feed packed rows with ``position_ids`` and no
``attention_mask``; transformers derives a block-diagonal causal mask from the restarts. These
tests pin that property on a tiny Llama (sdpa and eager), with a negative control.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from pipeline.data.pack import pack_documents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ATOL = 1e-5


def _two_documents(tok: PreTrainedTokenizerBase, texts: list[str]) -> tuple[list[int], list[int]]:
    a, b = tok([texts[0], texts[1]], add_special_tokens=False)["input_ids"]
    return a[:20], b[:25]


def _logits(
    model: PreTrainedModel, ids: list[int], positions: list[int], **kwargs: object
) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), **kwargs)
    return out.logits[0]


def _alone(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    return _logits(model, ids, list(range(len(ids))), use_cache=False)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_match_documents_run_alone(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    attention: str,
    training: bool,
) -> None:
    model = make_tiny_llama(attention).train(training)  # dropout is 0: train mode is deterministic
    a, b = _two_documents(tokenizer, domain_texts)
    packed = _logits(model, a + b, list(range(len(a))) + list(range(len(b))), use_cache=False)
    torch.testing.assert_close(packed[: len(a)], _alone(model, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[len(a) :], _alone(model, b), atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_continuing_positions_let_the_second_document_see_the_first(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    attention: str,
) -> None:
    """Negative control: without the restarts the same row is one long causal sequence."""
    model = make_tiny_llama(attention)
    a, b = _two_documents(tokenizer, domain_texts)
    joined = _logits(model, a + b, list(range(len(a) + len(b))), use_cache=False)
    # The first document is unaffected either way (causal), the second is not isolated.
    torch.testing.assert_close(joined[: len(a)], _alone(model, a), atol=ATOL, rtol=0)
    gap = (joined[len(a) :] - _alone(model, b)).abs().max().item()
    assert gap > 1e-2


def test_blocks_from_pack_documents_are_isolated_per_segment(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
) -> None:
    """Three real documents (one split across blocks) packed by the pipeline, then padding."""
    model = make_tiny_llama("sdpa")
    docs = [d[:30] for d in tokenizer(domain_texts[:3], add_special_tokens=False)["input_ids"]]
    blocks = pack_documents(docs, 64, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(blocks) == 2
    with torch.no_grad():
        logits = model(
            input_ids=torch.as_tensor(blocks.input_ids, dtype=torch.long),
            position_ids=torch.as_tensor(blocks.position_ids, dtype=torch.long),
            use_cache=False,
        ).logits
    checked = 0
    for row in range(len(blocks)):
        starts = [*np.flatnonzero(blocks.position_ids[row] == 0).tolist(), 64]
        for start, end in pairwise(starts):
            segment = blocks.input_ids[row, start:end].tolist()
            torch.testing.assert_close(
                logits[row, start:end], _alone(model, segment), atol=ATOL, rtol=0
            )
            checked += 1
    assert checked == 5  # doc 1, doc 2, doc 3 head | doc 3 tail, padding


@pytest.mark.parametrize(
    "setup",
    [
        "eval",
        "train",
        "train_with_activation_checkpointing",
    ],
)
def test_the_forward_call_the_pipeline_makes_isolates_documents(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    setup: str,
) -> None:
    """Called exactly as score_blocks / train_steps call it: ids and positions, nothing else."""
    model = make_tiny_llama("sdpa")
    if setup != "eval":
        model.train()
    if setup == "train_with_activation_checkpointing":
        # Checkpointing turns use_cache off in training, which is why the presets are unaffected.
        model.activation_checkpointing_enable({"use_reentrant": False})
    a, b = _two_documents(tokenizer, domain_texts)
    packed = _logits(model, a + b, list(range(len(a))) + list(range(len(b))))
    torch.testing.assert_close(packed[len(a) :], _alone(model, b), atol=ATOL, rtol=0)
