"""Generation on held-out chats: prompts as training renders them, greedy decoding that is the
same with and without the KV cache and batched or not, the metrics on fixed strings, and one
model's whole ``ModelScores`` split over data-parallel parts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import torch

from pipeline.config import REPO_ROOT, load_config
from pipeline.data import chat
from pipeline.eval import generation, scores

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHATS = [
    [
        {"role": "system", "content": "You are a concise support agent."},
        {"role": "user", "content": "My pizza order is late. Where is it?"},
        {"role": "assistant", "content": "The courier is 5 minutes away."},
    ],
    [
        {"role": "user", "content": "Refund?"},
        {"role": "assistant", "content": "Yes, a refund was issued."},
        {"role": "user", "content": "Thanks. When will it arrive?"},
        {"role": "assistant", "content": "Within 3 days."},
        {"role": "user", "content": "ok"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": '{"status": "ok"}'}],
]


def test_prompt_is_the_conversation_before_the_last_answer_as_training_renders_it(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    before, reference = generation.split_chat(CHATS[1])
    assert reference == "Within 3 days." and before == CHATS[1][:3]
    for fmt, header in (("chatml", "<|im_start|>assistant\n"),
                        ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n")):  # fmt: skip
        trained = "".join(text for text, _ in chat.render_segments(before, fmt))
        assert generation.render_prompt(before, tokenizer, fmt) == trained + header
    with pytest.raises(ValueError, match="no assistant turn"):
        generation.split_chat([{"role": "user", "content": "Hi"}])


def test_stops_at_eos_and_the_end_of_turn(
    make_tiny_llama: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> None:
    stops = generation.stop_token_ids(make_tiny_llama(), tokenizer, "chatml")
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _greedy_without_cache(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, stops: list[int], n: int
) -> str:
    """The reference decoder: the whole sequence re-run for every token, argmax, no cache."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        new.append(token)
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_batched_cached_generation_equals_one_by_one_without_cache(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    attention: str,
) -> None:
    model = make_tiny_llama(attention, seed=3)
    rows = generation.generate_answers(model, tokenizer, CHATS, "chatml", 12, 3, 100)
    stops = generation.stop_token_ids(model, tokenizer, "chatml")
    prompts = [row["prompt"] for row in rows]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 3  # really left-padded
    for row in rows:
        alone = generation.generate_batch(model, tokenizer, [row["prompt"]], stops, 12, 100)
        assert [row["answer"]] == alone
        assert row["answer"] == _greedy_without_cache(model, tokenizer, row["prompt"], stops, 12)
    assert [row["reference"] for row in rows] == [
        "The courier is 5 minutes away.",
        "Within 3 days.",
        '{"status": "ok"}',
    ]
    assert rows[0]["answer"] == "c30com m12Act\x14 782ar 382"


def test_answers_end_at_the_first_stop_token(
    make_tiny_llama: Callable[..., PreTrainedModel], tokenizer: PreTrainedTokenizerBase
) -> None:
    model = make_tiny_llama()
    word = tokenizer(" order", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    # A head that always prefers one token: zero weights, a bias on that token.
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.lm_head = head
    prompt = generation.render_prompt(CHATS[0][:2], tokenizer, "chatml")
    stops = generation.stop_token_ids(model, tokenizer, "chatml")
    with torch.no_grad():
        head.bias[word[0]] = 1.0
    assert generation.generate_batch(model, tokenizer, [prompt], stops, 4, 100) == [
        "order order order order"
    ]
    with torch.no_grad():
        head.bias[stops[1]] = 2.0  # <|im_end|>
    assert generation.generate_batch(model, tokenizer, [prompt], stops, 4, 100) == [""]


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_on_fixed_strings() -> None:
    plain = generation.example_metrics(" The CAT\n sat ", "the cat sat", ["a"], [])
    assert plain == {
        "exact_match": 1.0, "rouge_l": 1.0, "json_valid": None, "json_keys": None, "keywords": None,
    }  # fmt: skip
    # LCS "the cat on mat" (4 tokens): precision 4/5, recall 4/6, F = 8/11.
    assert generation.rouge_l("the cat on a mat", "the cat sat on the mat") == pytest.approx(8 / 11)
    structured = generation.example_metrics(
        '```json\n{"status": "ok"}\n```', '{"status": "ok", "eta": 3}', ["status", "eta"],
        ["OK", "refund"],
    )  # fmt: skip
    assert structured["json_valid"] == 1.0
    assert structured["json_keys"] == 0.0  # "eta" missing
    assert structured["keywords"] == 0.5
    assert structured["exact_match"] == 0.0
    broken = generation.example_metrics('{"status": ', '{"status": "ok"}', [], [])
    assert (broken["json_valid"], broken["json_keys"]) == (0.0, None)
    assert generation.json_object("[1, 2]") is None  # an array is not an object


def test_means_skip_examples_a_metric_does_not_apply_to() -> None:
    examples = [
        {"exact_match": 1.0, "rouge_l": 1.0, "json_valid": None, "json_keys": None, "keywords": None},
        {"exact_match": 0.0, "rouge_l": 0.5, "json_valid": 1.0, "json_keys": None, "keywords": None},
        {"exact_match": 0.0, "rouge_l": 0.0, "json_valid": 0.0, "json_keys": None, "keywords": None},
    ]  # fmt: skip
    summary = generation.instruction_scores(examples)
    assert summary["examples"] == examples
    assert summary["means"] == {
        "exact_match": pytest.approx(1 / 3), "rouge_l": 0.5, "json_valid": 0.5,
        "json_keys": None, "keywords": None,
    }  # fmt: skip
    assert generation.instruction_scores([])["means"]["rouge_l"] is None


# --- one model's scores ----------------------------------------------------------------------


def test_scores_split_over_workers_merge_into_the_whole(
    make_tiny_llama: Callable[..., PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    domain_texts: list[str],
) -> None:
    cfg = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {"eval.max_documents": 5, "eval.max_generations": 3, "eval.max_new_tokens": 4,
         "eval.batch_size": 2, "eval.required_keywords": ["order"], "data.seq_len": 32},
    )  # fmt: skip
    demo = REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl"
    heldout = {
        "documents": domain_texts[:20],
        "chats": [json.loads(line)["messages"] for line in demo.read_text().splitlines()[:8]],
    }
    general = scores.general_documents(cfg, heldout)
    model = make_tiny_llama()
    whole = scores.score_model(model, tokenizer, heldout, general, cfg, "sdpa")
    shares = [
        scores.score_model(model, tokenizer, heldout, general, cfg, "sdpa", part, 3)
        for part in range(3)
    ]
    merged = scores.merge_scores(shares)
    assert list(whole) == ["domain", "general", "instructions", "answer_loss"]
    for name in ("domain", "general", "answer_loss"):
        assert len(whole[name]["documents"]) == 5
        assert merged[name]["bytes"] == whole[name]["bytes"]
        assert merged[name]["tokens"] == whole[name]["tokens"]
        assert merged[name]["bits_per_byte"] == pytest.approx(whole[name]["bits_per_byte"])
    assert merged["instructions"] == whole["instructions"]
    assert len(whole["instructions"]["examples"]) == 3
    assert whole["instructions"]["means"]["keywords"] is not None
    assert round(whole["domain"]["bits_per_byte"], 4) == 1.9837
    assert scores.part_of(list(range(7)), 2, 3) == [5, 6]
    assert scores.part_of(list(range(2)), 2, 3) == []
