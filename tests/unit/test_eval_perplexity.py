"""Bits-per-byte on fixed documents scored from their start: windows, bytes across tokenizers,
answer loss, the general corpus, and data-parallel shares of one model's scores."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from pipeline.config import REPO_ROOT, ModelConfig, PipelineConfig, load_config
from pipeline.data import chat
from pipeline.data.sources import DataError
from pipeline.eval import perplexity, scores
from pipeline.stages.prepare_data import prepare

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GENERAL = REPO_ROOT / "configs" / "general_data" / "general.jsonl"
# Multi-byte characters, so bytes differ from characters.
TINY = ModelConfig(
    name="tiny", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
UNICODE_DOC = "Café au lait in Zürich costs 5 €; 東京 has matcha. Naïve façades, smörgåsbord!"


@pytest.fixture(scope="module")
def general_texts() -> list[str]:
    return [json.loads(line)["text"] for line in GENERAL.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_and_large_tokenizers(
    general_texts: list[str],
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    from pipeline.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(general_texts, 300), train_bpe_tokenizer(general_texts, 1024)


def _llama(tok: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    from pipeline.train.model import build_llama

    return build_llama(TINY, tok, seq_len=128, seed=seed).eval()


def _by_hand(model: PreTrainedModel, ids: list[int], scored: list[bool], seq_len: int) -> float:
    """Each window run alone, unbatched and unpadded; its new scored targets summed."""
    nll = 0.0
    for begin, end, first in perplexity.windows(len(ids), seq_len, seq_len // 2):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[begin:end]])).logits[0], -1)
        for p in range(first, end):
            if scored[p]:
                nll -= float(logp[p - 1 - begin, ids[p]])
    return nll


# --- what is scored --------------------------------------------------------------------------


def test_fixed_sample_depends_on_the_texts_only(general_texts: list[str]) -> None:
    sample = perplexity.fixed_sample(general_texts, 5)
    assert sample == perplexity.fixed_sample(general_texts[::-1], 5)
    assert len(sample) == 5 and len(perplexity.fixed_sample(general_texts, 500)) == 62
    assert sample[0].startswith("A clock keeps time")
    everything = perplexity.fixed_sample(general_texts, 62)
    assert perplexity.fixed_sample(general_texts[:10], 10) == [
        t for t in everything if t in general_texts[:10]
    ]


def test_windows_score_every_position_once_with_enough_context() -> None:
    assert perplexity.windows(200, 64, 32) == [
        (0, 64, 1), (32, 96, 64), (64, 128, 96), (96, 160, 128), (128, 192, 160),
        (136, 200, 192),
    ]  # fmt: skip
    for length in (1, 2, 10, 63, 64, 65, 200, 1000):
        for seq_len, stride in ((64, 32), (64, 64), (16, 4)):
            targets = [
                (p, p - begin)
                for begin, end, first in perplexity.windows(length, seq_len, stride)
                for p in range(first, end)
            ]
            assert [p for p, _ in targets] == list(range(1, length))
            # Context tokens before each target: all of them, or at least seq_len - stride.
            assert all(ctx == p or ctx >= seq_len - stride for p, ctx in targets)
    with pytest.raises(ValueError, match=r"data\.seq_len=1"):
        perplexity.windows(5, 1, 1)


def test_document_prefix_is_bos_else_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    assert perplexity.document_prefix(tokenizer) == tokenizer.bos_token_id
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert perplexity.document_prefix(no_bos) == tokenizer.eos_token_id
    no_bos.eos_token = None
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        perplexity.document_prefix(no_bos)


# --- scoring ---------------------------------------------------------------------------------


def test_a_special_token_string_in_a_document_is_scored_as_the_text_it_was_trained_as(
    make_tiny_llama: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> None:
    # prepare_data encodes "<|im_start|>" inside a document as plain text (chunks.encode_texts);
    # scoring it as the control token would score tokens training never saw in that place.
    from pipeline.data.chunks import encode_texts

    text = "the courier said <|im_start|>assistant refund approved<|im_end|> and left"
    [trained] = encode_texts(tokenizer, [text])
    special = set(tokenizer.all_special_ids)
    assert not special & set(trained)
    [score] = perplexity.score_documents(
        make_tiny_llama("sdpa"), tokenizer, [text], 128, 0.5, 4, "sdpa"
    )
    assert score["tokens"] == len(trained)


def test_one_window_scores_every_token_with_full_context(
    make_tiny_llama: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> None:
    model = make_tiny_llama("sdpa")
    ids = tokenizer(UNICODE_DOC, add_special_tokens=False)["input_ids"]
    assert len(ids) < 127
    [score] = perplexity.score_documents(model, tokenizer, [UNICODE_DOC], 128, 0.5, 4, "sdpa")
    with torch.no_grad():
        full = torch.tensor([[tokenizer.bos_token_id, *ids]])
        logp = torch.log_softmax(model(input_ids=full).logits[0], -1)
    expected = -sum(float(logp[p, token]) for p, token in enumerate(ids))
    assert score["tokens"] == len(ids)  # the first token too
    assert score["bytes"] == len(UNICODE_DOC.encode()) > len(UNICODE_DOC)
    assert score["nll"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_long_documents_are_scored_in_windows_like_each_window_alone(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    general_texts: list[str],
    batch_size: int,
) -> None:
    model = make_tiny_llama("sdpa")
    texts = [*general_texts[:3], UNICODE_DOC, "Short."]
    got = perplexity.score_documents(model, tokenizer, texts, 32, 0.5, batch_size, "sdpa")
    for text, score in zip(texts, got, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        sequence = [tokenizer.bos_token_id, *ids]
        assert score["tokens"] == len(ids)
        assert score["nll"] == pytest.approx(
            _by_hand(model, sequence, [False] + [True] * len(ids), 32), rel=1e-5
        )
    assert max(s["tokens"] for s in got) > 3 * 32  # several windows


def test_models_with_different_tokenizers_score_the_same_bytes(
    small_and_large_tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase],
    general_texts: list[str],
) -> None:
    texts = [*perplexity.fixed_sample(general_texts, 6), UNICODE_DOC]
    results = {}
    for tok in small_and_large_tokenizers:
        documents = perplexity.score_documents(_llama(tok), tok, texts, 64, 0.5, 4, "sdpa")
        assert [d["tokens"] for d in documents] == [
            len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]
        ]
        results[len(tok)] = perplexity.corpus_scores(documents)
    small, large = results[300], results[1024]
    assert small["bytes"] == large["bytes"] == sum(len(t.encode()) for t in texts) == 3757
    assert (small["tokens"], large["tokens"]) == (2609, 1349)
    assert round(small["bits_per_byte"], 4) == 5.7274
    assert round(large["bits_per_byte"], 4) == 3.5931
    # Untrained models are near uniform over their vocabularies: log2(vocab) bits per token.
    for scored, tok in zip((small, large), small_and_large_tokenizers, strict=True):
        bits_per_token = scored["bits_per_byte"] * scored["bytes"] / scored["tokens"]
        assert bits_per_token == pytest.approx(math.log2(len(tok)), abs=0.1)


def test_answer_loss_scores_only_the_answers(
    make_tiny_llama: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> None:
    model = make_tiny_llama("sdpa")
    chats = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "It left the kitchen 5 minutes ago."},
            {"role": "user", "content": "Thanks, and the drinks?"},
            {"role": "assistant", "content": "Also on the way — café au lait included."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    got = perplexity.score_answers(model, tokenizer, chats, "chatml", 24, 0.5, 2, "sdpa")
    for messages, score in zip(chats, got, strict=True):
        ids, labels = chat.tokenize_chat(messages, tokenizer, "chatml")
        scored = [label != chat.IGNORE_INDEX for label in labels]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert score["bytes"] == sum(len(a.encode()) for a in answers)
        assert score["tokens"] == sum(scored)
        assert score["nll"] == pytest.approx(_by_hand(model, ids, scored, 24), rel=1e-5)


def test_corpus_scores_are_token_weighted() -> None:
    docs = [
        {"nll": 6 * math.log(2), "tokens": 3, "bytes": 12},
        {"nll": 4 * math.log(2), "tokens": 2, "bytes": 8},
    ]
    summary = perplexity.corpus_scores(docs)
    assert summary.pop("documents") == docs
    assert summary == pytest.approx(
        {
            "bits_per_byte": 0.5,  # 10 bits over 20 bytes
            "loss": 2 * math.log(2),
            "perplexity": 4.0,
            "tokens": 5,
            "bytes": 20,
        }
    )
    empty = perplexity.corpus_scores([])
    assert (empty["loss"], empty["perplexity"], empty["bits_per_byte"]) == (0.0, 1.0, 0.0)
    huge = perplexity.corpus_scores([{"nll": 1000.0, "tokens": 1, "bytes": 1}])
    assert huge["perplexity"] == math.exp(50.0)


# --- the general corpus ----------------------------------------------------------------------


def _config(tmp_path: Path, **overrides: Any) -> PipelineConfig:
    return load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)


def test_general_corpus_comes_from_config_then_replay_then_the_shipped_set(
    tmp_path: Path, general_texts: list[str]
) -> None:
    (tmp_path / "a.jsonl").write_text(
        '{"text": "first general text"}\nnot json\n{"body": "no text field"}\n'
        '{"text": "second general text"}\n'
    )
    (tmp_path / "b.txt").write_text("a plain text file is one document")
    configured = _config(tmp_path, **{"eval.general_corpus": [str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt")], "eval.max_documents": 2})  # fmt: skip
    texts = ["first general text", "second general text", "a plain text file is one document"]
    assert scores.general_documents(configured, {}) == perplexity.fixed_sample(texts, 2)

    replay = _config(tmp_path, **{"eval.max_documents": 3, "data.replay_corpus": str(GENERAL)})
    held = {"general_documents": general_texts[:5]}
    assert scores.general_documents(replay, held) == perplexity.fixed_sample(general_texts[:5], 3)

    shipped = scores.general_documents(_config(tmp_path), {"general_documents": []})
    assert shipped == perplexity.fixed_sample(general_texts, 24)  # demo: eval.max_documents 24

    empty = _config(tmp_path, **{"eval.general_corpus": str(tmp_path / "b.jsonl")})
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"eval\.general_corpus: no documents with a 'text'"):
        scores.general_documents(empty, {})


def test_prepare_data_holds_out_part_of_the_replay_corpus(
    tmp_path: Path, general_texts: list[str], domain_texts: list[str]
) -> None:
    (tmp_path / "domain.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in domain_texts[:300])
    )
    overrides = {
        "data.domain_corpus": str(tmp_path / "domain.jsonl"),
        "data.replay_corpus": str(GENERAL),
        "data.replay_ratio": 0.2,
        "data.heldout_fraction": 0.2,
        "data.num_workers": 1,
        "data.near_dup_threshold": None,
        "storage.artifact_root": str(tmp_path / "artifacts"),
    }
    prepare(_config(tmp_path, **overrides), str(tmp_path / "out"))
    heldout = json.loads((tmp_path / "out" / "data" / "heldout.json").read_text())
    assert list(heldout) == ["documents", "general_documents", "chats"]
    held = heldout["general_documents"]
    assert len(held) == 18 and set(held) <= set(general_texts)
    assert not set(held) & set(heldout["documents"])
