"""Promotion gates over bits-per-byte, and the held-out scoring they are computed from."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from pipeline.config import EvalConfig
from pipeline.data.chat import IGNORE_INDEX
from pipeline.data.pack import PackedBlocks, pack_documents
from pipeline.data.tokenizer import token_byte_lengths
from pipeline.eval.gates import evaluate_gates, gates_report
from pipeline.eval.perplexity import HeldoutScore, score_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _scores(
    base: float, candidate: float, champion: float | None = None, candidate_domain: float = 2.0
) -> dict[str, Any]:
    """bits_per_byte per model; every domain score is 2.0 except the candidate's."""
    instructions = {"base": base, "candidate": candidate}
    if champion is not None:
        instructions["champion"] = champion
    return {
        model: {
            "instructions": {"bits_per_byte": bpb},
            "domain": {"bits_per_byte": candidate_domain if model == "candidate" else 2.0},
        }
        for model, bpb in instructions.items()
    }


def _verdicts(scores: dict[str, Any], **cfg: float) -> dict[str, bool]:
    return {g.name: g.passed for g in evaluate_gates(scores, EvalConfig(**cfg))}


# --- gates -------------------------------------------------------------------------------


def test_without_champion_the_candidate_only_has_to_beat_base() -> None:
    gates = evaluate_gates(_scores(base=1.2, candidate=1.0), EvalConfig())
    assert [(g.name, g.passed) for g in gates] == [
        ("beats_base_on_instructions", True),
        ("no_champion_yet", True),
    ]
    assert gates[0].detail == "candidate 1.0000 vs base 1.2000 bits/byte"
    assert gates_report(gates)["passed"] is True


def test_without_champion_a_tie_with_base_fails() -> None:
    report = gates_report(evaluate_gates(_scores(base=1.2, candidate=1.2), EvalConfig()))
    assert report["passed"] is False
    assert report["gates"][0] == {
        "name": "beats_base_on_instructions",
        "passed": False,
        "detail": "candidate 1.2000 vs base 1.2000 bits/byte",
    }


def test_candidate_equal_to_champion_does_not_beat_it() -> None:
    verdicts = _verdicts(_scores(base=2.0, candidate=1.5, champion=1.5))
    assert verdicts == {
        "beats_base_on_instructions": True,
        "beats_champion_on_instructions": False,
        "domain_within_regression": True,
    }


def test_min_improvement_boundary() -> None:
    # Values exact in binary: (2.0 - 1.5) / 2.0 == 0.25 with no rounding.
    at = _verdicts(_scores(base=3.0, candidate=1.5, champion=2.0), min_improvement=0.25)
    assert at["beats_champion_on_instructions"] is True
    below = _verdicts(_scores(base=3.0, candidate=1.5001, champion=2.0), min_improvement=0.25)
    assert below["beats_champion_on_instructions"] is False
    gate = evaluate_gates(
        _scores(base=3.0, candidate=1.5, champion=2.0), EvalConfig(min_improvement=0.25)
    )[1]
    assert gate.detail == "improvement +25.00% (needs > 0 and >= 25.00%)"


def test_any_strict_improvement_passes_with_zero_min_improvement() -> None:
    verdicts = _verdicts(_scores(base=3.0, candidate=1.9999, champion=2.0), min_improvement=0.0)
    assert verdicts["beats_champion_on_instructions"] is True


def test_domain_regression_boundary() -> None:
    def verdicts(candidate_domain: float) -> dict[str, bool]:
        scores = _scores(base=3.0, candidate=1.0, champion=2.0, candidate_domain=candidate_domain)
        return _verdicts(scores, max_domain_regression=0.25)

    assert verdicts(1.5)["domain_within_regression"] is True  # improved
    assert verdicts(2.5)["domain_within_regression"] is True  # (2.5 - 2.0) / 2.0 == 0.25
    over = verdicts(2.5001)
    assert over["domain_within_regression"] is False
    assert over["beats_champion_on_instructions"] is True
    gates = evaluate_gates(
        _scores(base=3.0, candidate=1.0, champion=2.0, candidate_domain=2.5001),
        EvalConfig(max_domain_regression=0.25),
    )
    assert gates[2].detail == "domain change +25.01% (allowed <= 25.00%)"
    assert gates_report(gates)["passed"] is False


# --- HeldoutScore ------------------------------------------------------------------------


def test_heldout_score_math() -> None:
    score = HeldoutScore(nll_sum=10 * math.log(2), tokens=5, bytes=20)
    assert score.loss == pytest.approx(2 * math.log(2))
    assert score.perplexity == pytest.approx(4.0)
    assert score.bits_per_byte == pytest.approx(0.5)  # 10 bits over 20 bytes
    assert score.as_dict() == pytest.approx(
        {
            "nll_sum": 10 * math.log(2),
            "tokens": 5,
            "bytes": 20,
            "loss": 2 * math.log(2),
            "perplexity": 4.0,
            "bits_per_byte": 0.5,
        }
    )


def test_heldout_score_edge_cases() -> None:
    empty = HeldoutScore(nll_sum=0.0, tokens=0, bytes=0)
    assert (empty.loss, empty.perplexity, empty.bits_per_byte) == (0.0, 1.0, 0.0)
    assert HeldoutScore(nll_sum=1000.0, tokens=1, bytes=1).perplexity == math.exp(50.0)


# --- score_blocks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_lengths(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return token_byte_lengths(tokenizer)


def _one_document_per_block(
    tok: PreTrainedTokenizerBase, texts: list[str], seq_len: int
) -> tuple[PackedBlocks, list[list[int]]]:
    docs = [d[: seq_len - 8] for d in tok(texts, add_special_tokens=False)["input_ids"]]
    parts = [pack_documents([d], seq_len, tok.eos_token_id, tok.pad_token_id) for d in docs]
    assert all(len(p) == 1 for p in parts)
    stacked = PackedBlocks(
        *(
            np.concatenate([getattr(p, k) for p in parts])
            for k in ("input_ids", "position_ids", "labels")
        )
    )
    return stacked, docs


def test_score_blocks_equals_cross_entropy_summed_by_hand(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    byte_lengths: list[int],
) -> None:
    model = make_tiny_llama("sdpa")
    blocks, docs = _one_document_per_block(tokenizer, domain_texts[:3], seq_len=48)
    score = score_blocks(model, blocks, byte_lengths, batch_size=2, max_batches=10)

    nll, count, nbytes = 0.0, 0, 0
    for row in range(len(blocks)):
        ids = torch.as_tensor(blocks.input_ids[row : row + 1], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0], dim=-1)
        for t in range(1, blocks.labels.shape[1]):
            target = int(blocks.labels[row, t])
            if target != IGNORE_INDEX:
                nll -= float(logp[t - 1, target])
                count += 1
                nbytes += byte_lengths[target]
    assert score.nll_sum == pytest.approx(nll, rel=1e-5)
    assert score.tokens == count
    # Every token but each document's first one is scored, plus its EOS.
    assert score.tokens == sum(len(d) for d in docs)
    assert score.tokens == int((blocks.labels[:, 1:] != IGNORE_INDEX).sum())
    # Bytes: the document's text minus its unscored first token; EOS is special (0 bytes).
    assert score.bytes == nbytes == sum(sum(byte_lengths[t] for t in d[1:]) for d in docs)
    # An untrained model is near uniform over the vocabulary.
    assert abs(score.loss - math.log(len(tokenizer))) < 0.5


def test_position_zero_label_is_never_scored(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    byte_lengths: list[int],
) -> None:
    model = make_tiny_llama("sdpa")
    blocks, _ = _one_document_per_block(tokenizer, domain_texts[:1], seq_len=48)
    unmasked = PackedBlocks(blocks.input_ids, blocks.position_ids, blocks.labels.copy())
    unmasked.labels[0, 0] = unmasked.input_ids[0, 0]  # nothing predicts position 0
    a = score_blocks(model, blocks, byte_lengths, batch_size=1, max_batches=1)
    b = score_blocks(model, unmasked, byte_lengths, batch_size=1, max_batches=1)
    assert (a.nll_sum, a.tokens, a.bytes) == (b.nll_sum, b.tokens, b.bytes)


def test_max_batches_bounds_the_blocks_scored(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    byte_lengths: list[int],
) -> None:
    model = make_tiny_llama("sdpa")
    blocks, docs = _one_document_per_block(tokenizer, domain_texts[:3], seq_len=48)
    limited = score_blocks(model, blocks, byte_lengths, batch_size=1, max_batches=2)
    first_two = PackedBlocks(blocks.input_ids[:2], blocks.position_ids[:2], blocks.labels[:2])
    full = score_blocks(model, first_two, byte_lengths, batch_size=2, max_batches=1)
    assert limited.tokens == full.tokens == len(docs[0]) + len(docs[1])
    assert limited.nll_sum == pytest.approx(full.nll_sum, rel=1e-5)


def test_packed_documents_score_like_documents_scored_alone(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
    byte_lengths: list[int],
) -> None:
    model = make_tiny_llama("sdpa")
    blocks, docs = _one_document_per_block(tokenizer, domain_texts[:2], seq_len=48)
    alone = score_blocks(model, blocks, byte_lengths, batch_size=2, max_batches=1)
    packed = pack_documents(docs, 96, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(packed) == 1
    together = score_blocks(model, packed, byte_lengths, batch_size=1, max_batches=1)
    assert (together.tokens, together.bytes) == (alone.tokens, alone.bytes)
    assert together.nll_sum == pytest.approx(alone.nll_sum, rel=1e-5)
