"""Models in and out: a Llama 2-style base tokenizer gets the chat tokens it lacks, the model's
embeddings grow to match, and the export reloads to equal weights with the KV cache on and the
chat template training rendered with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.data.chat import IGNORE_INDEX, render_segments, tokenize_chat
from pipeline.data.tokenizer import load_tokenizer, training_tokenizer
from pipeline.models import fetch_model
from pipeline.train.export import export_pretrained
from pipeline.train.model import load_training_model
from tests.tiny_presets import llama2_style_tokenizer, save_base_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CONVERSATION = [
    {"role": "system", "content": "You are a concise support agent."},
    {"role": "user", "content": "Where is my pad thai?"},
    {"role": "assistant", "content": "The courier was delayed by traffic."},
    {"role": "user", "content": "Thanks. Will it arrive today?"},
    {"role": "assistant", "content": "Yes, within twenty minutes."},
]


@pytest.fixture(scope="module")
def llama2_tok(domain_texts: list[str]) -> PreTrainedTokenizerFast:
    """600 tokens: <unk> <s> </s>, 256 byte tokens, 341 learned pieces; no ChatML, no pad."""
    return llama2_style_tokenizer(domain_texts[:300], vocab_size=600)


@pytest.fixture(scope="module")
def llama2_base(
    llama2_tok: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return save_base_model(tmp_path_factory.mktemp("llama2-base"), "llama", llama2_tok)


@pytest.fixture(scope="module")
def training_tok_dir(llama2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare_data's tokenizer for a Llama 2 base with chat_format chatml."""
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {"model.base": str(llama2_base), "data.chat_format": "chatml"},
    )
    out = tmp_path_factory.mktemp("training-tokenizer")
    training_tokenizer(config, out / "scratch").save_pretrained(str(out))
    return out


def test_llama2_tokenizer_gets_the_chatml_tokens_and_template(
    llama2_tok: PreTrainedTokenizerFast, training_tok_dir: Path
) -> None:
    assert len(llama2_tok) == 600 and "<|im_start|>" not in llama2_tok.get_vocab()
    tok = load_tokenizer(training_tok_dir)
    assert len(tok) == 602
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [600, 601]
    # The turn markers are single special ids, and decoding without specials drops them.
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 600 and ids[-1] == 601
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)
    assert tok.pad_token == "</s>"  # Llama 2 has no pad token: EOS stands in
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "".join(text for text, _ in render_segments(CONVERSATION, "chatml"))


def test_training_ids_are_what_apply_chat_template_produces(training_tok_dir: Path) -> None:
    """Tokenizing the whole rendered conversation keeps a SentencePiece tokenizer's word
    boundaries as in serving; segment by segment, every segment would start with a "▁"."""
    tok = load_tokenizer(training_tok_dir)
    ids, labels = tokenize_chat(CONVERSATION, tok, "chatml")
    served = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True)
    assert ids == served["input_ids"]
    assert [label != IGNORE_INDEX for label in labels] == [
        bool(m) for m in served["assistant_masks"]
    ]
    segmentwise = [
        i
        for text, _ in render_segments(CONVERSATION, "chatml")
        for i in tok(text, add_special_tokens=False)["input_ids"]
    ]
    assert segmentwise != ids
    trained = tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert (
        trained
        == "The courier was delayed by traffic.<|im_end|>Yes, within twenty minutes.<|im_end|>"
    )


def test_training_model_grows_its_embeddings_to_the_tokenizer(
    llama2_base: Path, training_tok_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama2_base))
    model, base_vocab = load_training_model(llama2_base, training_tok_dir, "sdpa", torch.float32)
    assert base_vocab == 600
    assert model.config.vocab_size == 602
    assert model.get_input_embeddings().weight.shape == (602, 32)
    assert model.get_output_embeddings().weight.shape == (602, 32)
    assert model.config.use_cache is False
    # The base vocabulary's rows are untouched; the new rows start near their mean.
    old = base.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert torch.equal(new[:600], old)
    assert torch.allclose(new[600:].mean(0), old.mean(0), atol=0.05)


def test_export_reloads_to_equal_weights_with_cache_on_and_the_chat_template(
    llama2_base: Path, training_tok_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model, _ = load_training_model(llama2_base, training_tok_dir, "sdpa", torch.float32)
    export_pretrained(model, None, training_tok_dir, "chatml", tmp_path)
    assert model.config.use_cache is False  # training settings restored after the export

    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    generation = GenerationConfig.from_pretrained(str(tmp_path))
    assert generation.use_cache is True
    assert generation.eos_token_id == [2, 601]  # </s> and <|im_end|>
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.use_cache is True
    expected, got = model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)

    tok = load_tokenizer(tmp_path)
    assert len(tok) == 602
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "".join(text for text, _ in render_segments(CONVERSATION, "chatml"))
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(
        "<|im_start|>user\nWhere is my pad thai?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_base_tokenizer_template_is_used_with_chat_format_tokenizer(
    llama2_base: Path, tmp_path: Path
) -> None:
    own = (
        "{% for m in messages %}{{ '<s>[' + m['role'] + '] ' + m['content'] + ' </s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>[assistant]' }}{% endif %}"
    )
    tok = load_tokenizer(llama2_base)
    tok.chat_template = own
    tok.save_pretrained(str(tmp_path))
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "model.base": str(llama2_base),
            "model.tokenizer": str(tmp_path),
            "data.chat_format": "tokenizer",
        },
    )
    tok = training_tokenizer(config, tmp_path / "scratch")
    assert len(tok) == 600 and tok.chat_template == own  # nothing added, template kept
    ids, labels = tokenize_chat(CONVERSATION[1:3], tok, "tokenizer")
    assert ids == tok.apply_chat_template(CONVERSATION[1:3])["input_ids"]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "The courier was delayed by traffic. </s>"


def test_chat_format_tokenizer_without_a_template_names_the_field(llama2_base: Path) -> None:
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {"model.base": str(llama2_base), "data.chat_format": "tokenizer"},
    )
    with pytest.raises(
        ValueError, match=r"data\.chat_format='tokenizer' needs a tokenizer with a chat_template"
    ):
        training_tokenizer(config, llama2_base / "unused")


def test_local_base_is_used_in_place_and_registry_uris_stay_uris(llama2_base: Path) -> None:
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml", {"model.base": "models:/domain-llm@champion"}
    )
    assert config.model.base == "models:/domain-llm@champion"
    assert fetch_model(str(llama2_base), config.tracking) == llama2_base
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        fetch_model(str(llama2_base / "missing"), config.tracking)
