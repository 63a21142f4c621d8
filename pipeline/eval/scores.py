"""What one model is scored on, and its scores (the contract's ``ModelScores``).

The evaluate stage loads a model and its tokenizer and calls ``score_model``; with several
data-parallel workers each scores one ``part`` of the fixed documents and chats, and
``merge_scores`` joins the parts in order, so the per-document lists stay aligned across models.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import REPO_ROOT, PipelineConfig
from pipeline.eval import generation, perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")
SHIPPED_GENERAL = REPO_ROOT / "configs" / "general_data" / "general.jsonl"
"""General English text shipped with the project: the forgetting gate's corpus of last resort."""
log = logging.getLogger(__name__)


def general_documents(cfg: PipelineConfig, heldout: dict[str, Any]) -> list[str]:
    """The general (non-domain) texts of the forgetting gate, a fixed sample of at most
    ``eval.max_documents``: ``eval.general_corpus`` when set, else the replay corpus's held-out
    part (``heldout["general_documents"]``, written by prepare_data), else the shipped set.

    Raises:
        DataError: ``eval.general_corpus`` names no readable file or holds no text.
    """
    limit = cfg.eval.max_documents
    if cfg.eval.general_corpus is not None:
        return read_general_corpus(cfg.eval.general_corpus, "eval.general_corpus", cfg, limit)
    held = heldout.get("general_documents") or []
    if held:
        return perplexity.fixed_sample(held, limit)
    if cfg.data.replay_corpus is not None:
        log.warning(
            "data.replay_corpus has no held-out documents in heldout.json (too small, or "
            "prepared by an older version); the forgetting gate uses %s",
            SHIPPED_GENERAL,
        )
    return read_general_corpus(str(SHIPPED_GENERAL), "the shipped general text set", cfg, limit)


def read_general_corpus(
    spec: str | list[str], field: str, cfg: PipelineConfig, limit: int
) -> list[str]:
    """The fixed sample (``perplexity.fixed_sample``) of documents in the files ``spec`` names,
    read and cleaned as prepare_data reads documents; memory holds ``limit`` texts at a time.

    Raises:
        DataError: no file, or no readable document, in ``spec``; the message names ``field``.
    """
    import hashlib

    from pipeline.data import ingest, sources

    kept: list[tuple[str, str]] = []  # (sha256, text), trimmed to the smallest digests
    for unit in sources.plan_units(sources.expand_inputs(spec, field), 1 << 26):
        for record in sources.read_unit(unit)[1]:
            if not isinstance(record, sources.Record):
                continue
            text = ingest.document_text(record.value, cfg.data.fields)
            if not isinstance(text, str) or not text.strip():
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            kept.append((digest, text))
            if len(kept) > 4 * limit:
                kept = heapq.nsmallest(limit, kept)
    if not kept:
        raise sources.DataError(
            f"{field}: no documents with a {cfg.data.fields.text!r} text in {spec}; point it at "
            "JSONL/JSON/Parquet records with that field (data.fields.text) or text files"
        )
    return perplexity.fixed_sample([text for _, text in heapq.nsmallest(limit, kept)], limit)


def part_of(items: Sequence[T], part: int, parts: int) -> list[T]:
    """The ``part``-th of ``parts`` contiguous, near-equal slices of ``items`` (parts joined in
    order give ``items`` back)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in 0..{parts - 1}")
    size, extra = divmod(len(items), parts)
    start = part * size + min(part, extra)
    return list(items[start : start + size + (part < extra)])


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: dict[str, Any],
    general_docs: list[str],
    cfg: PipelineConfig,
    attention: str,
    part: int = 0,
    parts: int = 1,
) -> dict[str, Any]:
    """The contract's ``ModelScores`` of one model (of its ``part``-th share of the data when
    the work is split over ``parts`` workers; join the shares with ``merge_scores``).

    Domain and general: ``eval.max_documents`` fixed documents each. Chats: a fixed sample of
    the held-out chats; the first ``eval.max_documents`` give ``answer_loss``, the first
    ``eval.max_generations`` are answered by generation (``instructions``).

    Args:
        model: the loaded causal LM in eval mode (may be sharded with ``device_map="auto"``).
        tokenizer: its tokenizer.
        heldout: ``heldout.json`` of prepare_data (``documents``, ``chats``).
        general_docs: ``general_documents(cfg, heldout)``.
        cfg: the run's config (``data.seq_len``, ``data.chat_format``, ``eval.*``).
        attention: the kernel the model was loaded with.
        part, parts: which contiguous share of every list to score.
    """
    e, d = cfg.eval, cfg.data
    domain = perplexity.fixed_sample(heldout["documents"], e.max_documents)
    general = perplexity.fixed_sample(general_docs, e.max_documents)
    chats = perplexity.fixed_sample(
        heldout["chats"], max(e.max_documents, e.max_generations), perplexity.chat_key
    )

    def documents(texts: list[str]) -> list[dict[str, Any]]:
        return perplexity.score_documents(
            model, tokenizer, part_of(texts, part, parts), d.seq_len, e.window_stride,
            e.batch_size, attention,
        )  # fmt: skip

    answers = perplexity.score_answers(
        model, tokenizer, part_of(chats[: e.max_documents], part, parts), d.chat_format,
        d.seq_len, e.window_stride, e.batch_size, attention,
    )  # fmt: skip
    examples = generation.score_generations(
        model, tokenizer, part_of(chats[: e.max_generations], part, parts), d.chat_format,
        e.max_new_tokens, e.batch_size, max(1, d.seq_len - e.max_new_tokens),
        e.json_required_keys, e.required_keywords,
    )  # fmt: skip
    return {
        "domain": perplexity.corpus_scores(documents(domain)),
        "general": perplexity.corpus_scores(documents(general)),
        "instructions": generation.instruction_scores(examples),
        "answer_loss": perplexity.corpus_scores(answers),
    }


def merge_scores(shares: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``ModelScores`` from the shares ``score_model`` gave for parts 0, 1, ... (in order)."""
    merged = {
        name: perplexity.corpus_scores([doc for s in shares for doc in s[name]["documents"]])
        for name in ("domain", "general", "answer_loss")
    }
    examples = [ex for s in shares for ex in s["instructions"]["examples"]]
    return {**merged, "instructions": generation.instruction_scores(examples)}
