"""Unit-test fixtures: a byte-level BPE tokenizer trained locally and a tiny Llama factory.

Nothing is downloaded: the tokenizer is trained on the demo domain corpus in about two seconds,
and models are freshly initialised from a small ``ModelConfig``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from pipeline.config import REPO_ROOT, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_DATA = REPO_ROOT / "configs" / "demo_data"
TINY_MODEL = ModelConfig(
    name="tiny", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="session")
def domain_texts() -> list[str]:
    """The ``text`` of every record in the demo domain corpus."""
    lines = (DEMO_DATA / "domain.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


@pytest.fixture(scope="session")
def tokenizer(domain_texts: list[str]) -> PreTrainedTokenizerBase:
    """Byte-level BPE (1024 tokens, chatml specials) trained on the demo domain corpus.

    Shared by the whole session: tests must not add tokens to it.
    """
    from pipeline.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(domain_texts, vocab_size=1024)


@pytest.fixture
def make_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
) -> Callable[..., PreTrainedModel]:
    """Build a freshly initialised 2-layer Llama on the session tokenizer's vocabulary."""
    from pipeline.train.model import build_llama

    def make(attention: str = "sdpa", seed: int = 0, seq_len: int = 128) -> PreTrainedModel:
        model = build_llama(TINY_MODEL, tokenizer, seq_len=seq_len, seed=seed)
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        return model.eval()

    return make
