"""Packed documents stay isolated on every attention kernel, at every micro-batch size.

``packed_model_inputs`` is what the training loop and ``score_sequences`` pass to the model. These
tests run a tiny Llama (grouped-query: 4 heads, 2 key/value heads) on multi-row packed batches
(several documents of uneven length per row, one split across rows, a padding segment) and pin
every segment's logits to the same segment run alone, on document_sdpa (what ``compute.attention:
sdpa`` loads), sdpa with a dense mask and eager (train and eval), flex attention, and the
flash-attention code path. document_sdpa is also pinned to sdpa one document at a time with no
mask built, to the dense path's gradients, and to plain sdpa for generation and the export.

flash-attn does not run on CPU, so ``flash_kernels_on_cpu`` stands in a plain-torch reference
for its two kernels (``flash_attn_func``, ``flash_attn_varlen_func``); transformers' own flash
routing, which decides between them, runs unmodified. That routing is where the old call (ids and
positions, no mask) leaks at batch size > 1: the negative control pins it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.chat import IGNORE_INDEX
from pipeline.data.pack import PackedBlocks, pack_documents
from pipeline.eval import generation
from pipeline.eval.perplexity import score_sequences
from pipeline.train.attention import (
    DOCUMENT_SDPA,
    document_block_mask,
    document_starts,
    packed_model_inputs,
    register_document_sdpa,
    select_attention,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ATOL = 1e-5
SEQ_LEN = 40
# Documents + EOS: 31, 12, 24, 8, 20 tokens. In 40-token blocks: [31 | 9 of 12],
# [3 of 12 | 24 | 8 | 5 of 20], [15 of 20 | 25 padding]: 8 segments in 3 rows.
DOC_LENGTHS = (30, 11, 23, 7, 19)
SEGMENTS_PER_ROW = (2, 4, 2)
SCORED_TOKENS = 88  # 95 tokens (documents + EOS) minus the first token of each of 7 pieces
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="pins the CPU-only behaviour")


@pytest.fixture(autouse=True)
def _document_sdpa_registered() -> None:
    """Models here are built with ``DOCUMENT_SDPA`` directly, not through select_attention."""
    register_document_sdpa()


@pytest.fixture
def blocks(tokenizer: PreTrainedTokenizerBase, domain_texts: list[str]) -> PackedBlocks:
    """Three packed rows built by the pipeline's packer (see DOC_LENGTHS)."""
    ids = tokenizer(domain_texts[: len(DOC_LENGTHS)], add_special_tokens=False)["input_ids"]
    assert all(len(d) >= n for d, n in zip(ids, DOC_LENGTHS, strict=True))
    docs = [d[:n] for d, n in zip(ids, DOC_LENGTHS, strict=True)]
    packed = pack_documents(docs, SEQ_LEN, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(packed) == len(SEGMENTS_PER_ROW)
    return packed


def _segments(blocks: PackedBlocks) -> Iterator[tuple[int, int, int]]:
    """(row, start, end) of every document piece and padding run: positions restart at 0."""
    for row in range(len(blocks)):
        starts = [*np.flatnonzero(blocks.position_ids[row] == 0).tolist(), SEQ_LEN]
        for start, end in pairwise(starts):
            yield row, start, end


def _tensors(blocks: PackedBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(  # type: ignore[return-value]
        torch.as_tensor(a, dtype=torch.long)
        for a in (blocks.input_ids, blocks.position_ids, blocks.labels)
    )


def _alone(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one segment run by itself: one row, positions from 0, nothing to isolate."""
    with torch.no_grad():
        positions = torch.arange(len(ids))[None]
        return model(input_ids=ids[None], position_ids=positions, use_cache=False).logits[0]


def _packed_logits(model: PreTrainedModel, blocks: PackedBlocks, attention: str) -> torch.Tensor:
    ids, pos, _ = _tensors(blocks)
    with torch.no_grad():
        return model(**packed_model_inputs(ids, pos, attention)).logits.reshape(*ids.shape, -1)


def _segment_gaps(
    model: PreTrainedModel, blocks: PackedBlocks, logits: torch.Tensor
) -> list[float]:
    """Max |packed - alone| logit difference of every segment, in row order."""
    ids = torch.as_tensor(blocks.input_ids, dtype=torch.long)
    return [
        (logits[row, start:end] - _alone(model, ids[row, start:end])).abs().max().item()
        for row, start, end in _segments(blocks)
    ]


def _summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and scored-token count, HF-aligned labels."""
    target = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(loss), int((target != IGNORE_INDEX).sum())


def _reference_mask(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """``[B, 1, S, S]`` block-diagonal causal mask from the documents' lengths."""
    rows = [torch.block_diag(*(torch.ones(n, n).tril() for n in row)) for row in lengths_per_row]
    return torch.stack(rows).bool()[:, None]


def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in lengths_per_row])


# --- flash-attn kernels on CPU -------------------------------------------------------------


def _reference_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """flash_attn_func in plain torch: ``[B, S, H, D]`` in and out, GQA, causal per row."""
    assert dropout_p == 0.0
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def _reference_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """flash_attn_varlen_func in plain torch: ``[T, H, D]``, each cu_seqlens span on its own."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    spans = list(pairwise(cu_seqlens_q.tolist()))
    assert max_seqlen_q == max_seqlen_k == max(end - start for start, end in spans)
    return torch.cat(
        [
            _reference_flash_attn_func(
                q[None, a:b], k[None, a:b], v[None, a:b], dropout_p, softmax_scale, causal
            )[0]
            for a, b in spans
        ]
    )


@pytest.fixture
def flash_kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the reference kernels where transformers imports flash-attn's (restored afterwards)."""
    from transformers import modeling_flash_attention_utils as fa_utils

    for cached in (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
        "_process_flash_kwargs_fn",
        "_process_with_kvcache_kwargs_fn",
    ):
        monkeypatch.setattr(fa_utils, cached, None)

    def kernels(implementation: str | None, *args: object, **kwargs: object) -> tuple[object, ...]:
        assert implementation == "flash_attention_2"
        return (
            _reference_flash_attn_func,
            _reference_flash_attn_varlen_func,
            None,
            fa_utils._pad_input,
            fa_utils._unpad_input,
        )

    monkeypatch.setattr(fa_utils, "_lazy_imports", kernels)


@pytest.fixture
def flash_llama(
    make_tiny_llama: Callable[..., PreTrainedModel], flash_kernels_on_cpu: None
) -> PreTrainedModel:
    model = make_tiny_llama("sdpa")
    # set_attn_implementation would refuse: flash-attn is not installed on this machine.
    model.config._attn_implementation = "flash_attention_2"
    return model


# --- document_sdpa, sdpa and eager ----------------------------------------------------------


@pytest.mark.parametrize("setup", ["eval", "train", "train_with_activation_checkpointing"], ids=str)
@pytest.mark.parametrize("attention", [DOCUMENT_SDPA, "sdpa", "eager"])
def test_packed_rows_match_documents_run_alone(
    make_tiny_llama: Callable[..., PreTrainedModel],
    blocks: PackedBlocks,
    attention: str,
    setup: str,
) -> None:
    model = make_tiny_llama(attention)
    if setup != "eval":
        model.train()  # dropout is 0: train mode is deterministic
    if setup == "train_with_activation_checkpointing":
        model.activation_checkpointing_enable({"use_reentrant": False})
    gaps = _segment_gaps(model, blocks, _packed_logits(model, blocks, attention))
    assert len(gaps) == sum(SEGMENTS_PER_ROW) == 8
    assert max(gaps) < ATOL


@pytest.mark.parametrize("attention", [DOCUMENT_SDPA, "sdpa", "eager"])
def test_continuing_positions_let_the_second_document_see_the_first(
    make_tiny_llama: Callable[..., PreTrainedModel], blocks: PackedBlocks, attention: str
) -> None:
    """Negative control for the boundary rule: without restarts a row is one causal sequence."""
    model = make_tiny_llama(attention)
    ids = torch.as_tensor(blocks.input_ids, dtype=torch.long)
    continuing = torch.arange(SEQ_LEN).expand_as(ids)
    with torch.no_grad():
        logits = model(**packed_model_inputs(ids, continuing, attention)).logits.reshape(
            *ids.shape, -1
        )
    gaps = _segment_gaps(model, blocks, logits)
    first_of_row = [0, 2, 6]
    assert max(gaps[i] for i in first_of_row) < ATOL  # causal: the row's head is unaffected
    assert min(g for i, g in enumerate(gaps) if i not in first_of_row) > 1e-2


def test_sdpa_and_eager_masks_are_block_diagonal_causal() -> None:
    lengths = [[3, 2, 3], [5, 3]]
    pos = _positions(lengths)
    reference = _reference_mask(lengths)
    sdpa = packed_model_inputs(torch.zeros_like(pos), pos, "sdpa")["attention_mask"]
    assert sdpa.dtype == torch.bool and torch.equal(sdpa, reference)
    eager = packed_model_inputs(torch.zeros_like(pos), pos, "eager")["attention_mask"]
    assert eager.dtype == torch.float32 and eager.shape == (2, 1, 8, 8)
    assert torch.equal(eager[reference], torch.zeros(int(reference.sum())))
    assert bool((eager[~reference] == torch.finfo(torch.float32).min).all())
    assert int(reference.sum()) == (6 + 3 + 6) + (15 + 6)  # n(n+1)/2 per document


# --- document_sdpa: one sdpa call per document, no mask -------------------------------------


def test_document_sdpa_inputs_are_one_row_with_offsets_and_no_square_mask() -> None:
    pos = _positions([[3, 2, 3], [5, 3]])
    ids = torch.arange(16).reshape(2, 8)
    inputs = packed_model_inputs(ids, pos, DOCUMENT_SDPA)
    assert torch.equal(inputs["input_ids"], torch.arange(16)[None])
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 13, 16]
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["cu_seq_lens_q"].device.type == "cpu"  # read in Python by every layer
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5
    # A padding mask saying "no padding", [1, B*S]: nothing of size S x S goes in.
    mask = inputs["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (1, 16) and bool(mask.all())
    assert inputs["use_cache"] is False and "labels" not in inputs


def _spy_on_attention(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple], list[object]]:
    """Record every sdpa call (query length, key length, mask, is_causal) and every mask the
    Llama model builds."""
    from transformers.models.llama import modeling_llama

    calls: list[tuple] = []
    masks: list[object] = []
    sdpa, build_mask = F.scaled_dot_product_attention, modeling_llama.create_causal_mask

    def recording_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> object:
        calls.append((q.shape[-2], k.shape[-2], kw.get("attn_mask"), kw.get("is_causal")))
        return sdpa(q, k, v, **kw)

    def recording_mask(*args: object, **kwargs: object) -> object:
        masks.append(build_mask(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(modeling_llama, "create_causal_mask", recording_mask)
    return calls, masks


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_document_sdpa_runs_causal_sdpa_once_per_document_and_builds_no_mask(
    make_tiny_llama: Callable[..., PreTrainedModel],
    blocks: PackedBlocks,
    monkeypatch: pytest.MonkeyPatch,
    training: bool,
) -> None:
    """Work per block is the sum of its segments' squared lengths, not S x S."""
    model = make_tiny_llama(DOCUMENT_SDPA).train(training)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    calls, masks = _spy_on_attention(monkeypatch)
    ids, pos, _ = _tensors(blocks)
    with torch.set_grad_enabled(training):
        model(**packed_model_inputs(ids, pos, DOCUMENT_SDPA))
    lengths = [end - start for _, start, end in _segments(blocks)]
    assert lengths == [31, 9, 3, 24, 8, 5, 15, 25]  # 8 segments, the padding tail included
    assert masks == [None]
    assert calls == [(n, n, None, True) for n in lengths] * model.config.num_hidden_layers


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_document_sdpa_gradients_equal_the_dense_mask_path(
    make_tiny_llama: Callable[..., PreTrainedModel], blocks: PackedBlocks, checkpointing: bool
) -> None:
    """Same weights, same summed token loss: every parameter's gradient agrees with the
    block-diagonal mask on plain sdpa (whose logits the tests above pin to documents alone)."""
    ids, pos, labels = _tensors(blocks)
    grads, losses = {}, {}
    for attention in ("sdpa", DOCUMENT_SDPA):
        model = make_tiny_llama(attention).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        logits = model(**packed_model_inputs(ids, pos, attention)).logits.reshape(*ids.shape, -1)
        target = labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            target,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss.backward()
        losses[attention] = loss.item()
        grads[attention] = {name: p.grad for name, p in model.named_parameters()}
    assert losses[DOCUMENT_SDPA] == pytest.approx(losses["sdpa"], rel=1e-6)
    assert grads["sdpa"].keys() == grads[DOCUMENT_SDPA].keys()
    for name, dense in grads["sdpa"].items():
        assert dense.abs().max() > 0, name
        torch.testing.assert_close(grads[DOCUMENT_SDPA][name], dense, rtol=1e-4, atol=1e-5)


def test_a_block_of_one_document_per_row_is_plain_causal_attention(
    make_tiny_llama: Callable[..., PreTrainedModel], blocks: PackedBlocks
) -> None:
    """Rows that are each one document (positions 0..S-1): the logits of the unpacked batch."""
    model = make_tiny_llama(DOCUMENT_SDPA)
    ids = torch.as_tensor(blocks.input_ids, dtype=torch.long)
    whole_rows = torch.arange(SEQ_LEN).expand_as(ids)
    inputs = packed_model_inputs(ids, whole_rows, DOCUMENT_SDPA)
    assert inputs["cu_seq_lens_q"].tolist() == [0, SEQ_LEN, 2 * SEQ_LEN, 3 * SEQ_LEN]
    with torch.no_grad():
        packed = model(**inputs).logits.reshape(*ids.shape, -1)
        unpacked = model(input_ids=ids, use_cache=False).logits
    assert (packed - unpacked).abs().max().item() < ATOL


def test_document_sdpa_generates_like_sdpa_and_exports_without_its_name(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    """Left-padded batches with a KV cache take transformers' sdpa path; the saved config.json
    names no kernel, so the export loads anywhere on the default one."""
    from transformers import AutoModelForCausalLM

    prompts = ["<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n", "Hi"]
    stops = [tokenizer.eos_token_id]
    answers = {}
    for attention in ("sdpa", DOCUMENT_SDPA):
        model = make_tiny_llama(attention, seed=3)
        answers[attention] = generation.generate_batch(model, tokenizer, prompts, stops, 12, 100)
    assert answers[DOCUMENT_SDPA] == answers["sdpa"]
    assert all(len(a) > 0 for a in answers["sdpa"])

    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("attn_implementation" in key for key in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=ATOL)


def test_document_sdpa_refuses_offsets_that_do_not_cover_the_row(
    make_tiny_llama: Callable[..., PreTrainedModel],
) -> None:
    model = make_tiny_llama(DOCUMENT_SDPA)
    ids = torch.zeros(1, 8, dtype=torch.long)
    offsets = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="offsets ending at 6"):
        model(input_ids=ids, cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, use_cache=False)


# --- the flash-attention path ---------------------------------------------------------------


def test_varlen_offsets_mark_every_document_start_of_the_flattened_batch() -> None:
    pos = _positions([[3, 2, 3], [5, 3]])
    ids = torch.arange(16).reshape(2, 8)
    inputs = packed_model_inputs(ids, pos, "flash_attention_2")
    assert torch.equal(inputs["input_ids"], torch.arange(16)[None])
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 13, 16]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 5
    assert "attention_mask" not in inputs and "labels" not in inputs


def test_a_row_that_does_not_start_at_position_zero_still_starts_a_document() -> None:
    """A document never spans two rows of the flattened batch, whatever the positions say."""
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    inputs = packed_model_inputs(torch.zeros_like(pos), pos, "flash_attention_2")
    assert inputs["cu_seq_lens_q"].tolist() == [0, 4, 6, 8]
    assert document_starts(pos).tolist() == [
        [True, False, False, False],
        [True, False, True, False],
    ]


def test_old_call_without_boundaries_leaks_on_flash_attention_at_batch_size_3(
    flash_llama: PreTrainedModel, blocks: PackedBlocks
) -> None:
    """Negative control: ids + positions, no mask (the call before packed_model_inputs).

    Transformers reads flash-attention boundaries from position ids only at batch size 1, so
    the three-row batch runs plain causal attention across whole rows.
    """
    ids, pos, _ = _tensors(blocks)
    with torch.no_grad():
        rows = flash_llama(input_ids=ids, position_ids=pos, use_cache=False).logits
        one_row = flash_llama(input_ids=ids[1:2], position_ids=pos[1:2], use_cache=False).logits
    gaps = _segment_gaps(flash_llama, blocks, rows)
    first_of_row = [0, 2, 6]
    assert max(gaps[i] for i in first_of_row) < ATOL
    assert min(g for i, g in enumerate(gaps) if i not in first_of_row) > 1e-2
    # The same row alone (batch size 1) is isolated by transformers' position-id detection.
    row_1 = PackedBlocks(blocks.input_ids[1:2], blocks.position_ids[1:2], blocks.labels[1:2])
    assert max(_segment_gaps(flash_llama, row_1, one_row)) < ATOL


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_flash_inputs_match_documents_run_alone_on_the_flash_code_path(
    flash_llama: PreTrainedModel, blocks: PackedBlocks, training: bool
) -> None:
    flash_llama.train(training)
    gaps = _segment_gaps(
        flash_llama, blocks, _packed_logits(flash_llama, blocks, "flash_attention_2")
    )
    assert len(gaps) == 8
    assert max(gaps) < ATOL


@pytest.mark.parametrize("attention", [DOCUMENT_SDPA, "sdpa", "eager"])
def test_flattened_batch_gives_the_row_path_loss(
    make_tiny_llama: Callable[..., PreTrainedModel], blocks: PackedBlocks, attention: str
) -> None:
    """The flash inputs (one [1, B*S] row) run on sdpa/eager: same summed loss as the rows."""
    model = make_tiny_llama(attention)
    _, _, labels = _tensors(blocks)
    row_loss, row_tokens = _summed_token_loss(_packed_logits(model, blocks, attention), labels)
    flat_logits = _packed_logits(model, blocks, "flash_attention_2")
    flat_loss, flat_tokens = _summed_token_loss(flat_logits, labels)
    assert row_tokens == flat_tokens == SCORED_TOKENS
    assert flat_loss == pytest.approx(row_loss, rel=1e-6)


# --- flex attention -------------------------------------------------------------------------


def test_document_block_mask_allows_exactly_the_block_diagonal_causal_pairs() -> None:
    from torch.nn.attention.flex_attention import create_mask

    lengths = [[3, 2, 3], [5, 3]]
    pos = _positions(lengths)
    block_mask = packed_model_inputs(torch.zeros_like(pos), pos, "flex_attention")["attention_mask"]
    assert block_mask.shape == (2, 1, 8, 8)
    assert torch.equal(create_mask(block_mask.mask_mod, 2, 1, 8, 8), _reference_mask(lengths))


def test_document_block_mask_skips_exactly_the_empty_tiles() -> None:
    """Across 128-token tiles: a tile is computed iff some (q, kv) pair in it is allowed."""
    lengths = [[130, 200, 54], [384]]
    reference = _reference_mask(lengths)[:, 0]  # [B, S, S]
    tiles = reference.reshape(2, 3, 128, 3, 128).any(dim=(2, 4))
    block_mask = document_block_mask(document_starts(_positions(lengths)))
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), tiles)
    # Row 0: queries 256..383 (documents 1 and 2, from 130 on) never reach keys 0..127.
    assert tiles[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert tiles[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_flex_block_mask_rows_match_documents_run_alone(
    make_tiny_llama: Callable[..., PreTrainedModel], blocks: PackedBlocks
) -> None:
    """The document BlockMask, through transformers' flex_attention path. On CPU it runs
    flex_attention's eager reference (``force_eager``): inductor would compile it for a minute of
    the CI's two cores, and the compiled kernel is the GPU check's ``attn-flex`` row (the
    product refuses flex_attention on CPU)."""
    model = make_tiny_llama("flex_attention")
    with torch.compiler.set_stance("force_eager"):
        gaps = _segment_gaps(model, blocks, _packed_logits(model, blocks, "flex_attention"))
    assert len(gaps) == 8
    assert max(gaps) < ATOL


# --- evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [DOCUMENT_SDPA, "sdpa", "eager", "flash_attention_2"])
def test_score_sequences_scores_padded_rows_like_documents_alone(
    make_tiny_llama: Callable[..., PreTrainedModel],
    flash_kernels_on_cpu: None,
    tokenizer: PreTrainedTokenizerBase,
    blocks: PackedBlocks,
    attention: str,
) -> None:
    if attention == "flash_attention_2":
        model = make_tiny_llama("sdpa")
        model.config._attn_implementation = attention  # see flash_llama
    else:
        model = make_tiny_llama(attention)
    # Every segment a sequence of its own: right-padded rows of uneven length, 3 per batch.
    pieces = [
        (blocks.input_ids[row, start:end], blocks.labels[row, start:end])
        for row, start, end in _segments(blocks)
    ]
    sequences = [(ids.tolist(), (labels != IGNORE_INDEX).tolist()) for ids, labels in pieces]
    scored = score_sequences(
        model, sequences, SEQ_LEN, SEQ_LEN // 2, 3, attention, tokenizer.pad_token_id
    )
    score_nll, score_tokens = sum(n for n, _ in scored), sum(t for _, t in scored)

    nll, tokens = 0.0, 0
    ids, _, labels = _tensors(blocks)
    for row, start, end in _segments(blocks):
        logits = _alone(model, ids[row, start:end])[None]
        seg_nll, seg_tokens = _summed_token_loss(logits, labels[row : row + 1, start:end])
        nll, tokens = nll + seg_nll, tokens + seg_tokens
    assert score_tokens == tokens == SCORED_TOKENS
    assert score_nll == pytest.approx(nll, rel=1e-5)


# --- select_attention -----------------------------------------------------------------------


@NO_CUDA
def test_auto_is_document_sdpa_on_a_cpu_machine_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.train.attention"):
        assert select_attention("auto") == DOCUMENT_SDPA
    assert "attention backend: document_sdpa (requested auto)" in caplog.messages


def test_sdpa_resolves_to_document_sdpa_and_the_others_pass_through() -> None:
    assert select_attention("sdpa") == DOCUMENT_SDPA == "document_sdpa"
    assert select_attention("eager") == "eager"


@NO_CUDA
@pytest.mark.parametrize("requested", ["flash_attention_2", "flex_attention"])
def test_gpu_kernels_requested_on_cpu_name_the_config_field(requested: str) -> None:
    with pytest.raises(ValueError, match=rf"compute\.attention={requested} needs a CUDA device"):
        select_attention(requested)


def test_unknown_kernel_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"compute\.attention='flash' is not a kernel.*'sdpa'"):
        select_attention("flash")
    with pytest.raises(ValueError, match=r"no packed-input rule for attention 'auto'"):
        packed_model_inputs(torch.zeros(1, 4), torch.zeros(1, 4), "auto")
