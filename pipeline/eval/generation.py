"""Answers generated for held-out chats, and the metrics that compare them with the reference.

The prompt is a held-out conversation up to its last assistant turn, rendered in the chat format
the model was trained with (``data.chat_format``: the built-in template for chatml/llama3, the
tokenizer's own for ``tokenizer``) with the assistant header as generation prompt; the last
assistant turn is the reference. Decoding is greedy with the KV cache, prompts batched with left
padding, and stops at the format's end-of-turn token or EOS.

Metrics per example: ``exact_match`` (case and whitespace normalised), ``rouge_l`` (F-measure,
``rouge-score``), and, configured in ``eval``: ``json_valid`` / ``json_keys`` where the reference
is a JSON object, ``keywords`` (share of ``eval.required_keywords`` in the answer).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.data import chat
from pipeline.eval.perplexity import input_device

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

METRICS = ("exact_match", "rouge_l", "json_valid", "json_keys", "keywords")


def split_chat(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The turns before the last assistant turn, and that turn's content (the reference).

    Raises:
        ValueError: the chat has no assistant turn.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"held-out chat has no assistant turn to answer: {messages!r:.200}")
    return messages[:last], messages[last]["content"]


def render_prompt(
    messages: list[dict[str, str]], tok: PreTrainedTokenizerBase, fmt: chat.ChatFormat
) -> str:
    """The conversation rendered as training renders it, ending with the assistant header."""
    template = None if fmt == "tokenizer" else chat.chat_template(fmt)
    text = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def stop_token_ids(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, fmt: chat.ChatFormat
) -> list[int]:
    """EOS, the format's end-of-turn token, and any EOS the model's generation config names."""
    ids: list[int] = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    end = chat.end_of_turn_token(fmt)
    if end is not None and end in tok.get_vocab():
        end_id = tok.convert_tokens_to_ids(end)
        assert isinstance(end_id, int)
        ids.append(end_id)
    configured = getattr(model.generation_config, "eos_token_id", None)
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None:
            ids.append(int(token_id))
    return list(dict.fromkeys(ids))


def generate_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    chat_format: chat.ChatFormat,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int,
) -> list[dict[str, str]]:
    """``{"prompt", "reference", "answer"}`` for each chat, greedy, in order.

    A prompt longer than ``max_prompt_tokens`` keeps its last tokens (the turns nearest the
    answer).
    """
    stops = stop_token_ids(model, tok, chat_format)
    rendered = []
    for messages in chats:
        before, reference = split_chat(messages)
        rendered.append((render_prompt(before, tok, chat_format), reference))
    answers: list[str] = []
    for start in range(0, len(rendered), batch_size):
        prompts = [prompt for prompt, _ in rendered[start : start + batch_size]]
        answers += generate_batch(model, tok, prompts, stops, max_new_tokens, max_prompt_tokens)
    return [
        {"prompt": prompt, "reference": reference, "answer": answer}
        for (prompt, reference), answer in zip(rendered, answers, strict=True)
    ]


def generate_batch(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    stops: list[int],
    max_new_tokens: int,
    max_prompt_tokens: int,
) -> list[str]:
    """Greedy answers (KV cache on) to rendered prompts run as one left-padded batch; each is
    cut at its first stop token and decoded without special tokens."""
    import torch

    encoded = [tok(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, prompt_ids in enumerate(encoded):
        ids[row, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
        mask[row, width - len(prompt_ids) :] = 1
    device = input_device(model)
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]  # transformers types generate oddly
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=pad,
        )
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), len(row))
        answer = tok.decode(row[:cut], skip_special_tokens=True)
        assert isinstance(answer, str)
        answers.append(answer.strip())
    return answers


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


@functools.cache
def _rouge() -> RougeScorer:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure of the answer against the reference (rouge-score's tokenizer)."""
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object ``text`` holds (a surrounding Markdown code fence is allowed), or None."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def example_metrics(
    answer: str, reference: str, json_required_keys: Sequence[str], keywords: Sequence[str]
) -> dict[str, float | None]:
    """The metrics of one answer (``None``: the metric does not apply to this example)."""
    structured = json_object(reference) is not None
    parsed = json_object(answer) if structured else None
    found = [k for k in keywords if k.lower() in answer.lower()]
    return {
        "exact_match": float(normalize(answer) == normalize(reference)),
        "rouge_l": rouge_l(answer, reference),
        "json_valid": float(parsed is not None) if structured else None,
        "json_keys": (
            float(parsed is not None and all(k in parsed for k in json_required_keys))
            if structured and json_required_keys
            else None
        ),
        "keywords": len(found) / len(keywords) if keywords else None,
    }


def instruction_scores(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The contract's ``instructions`` dict: the examples and each metric's mean over the
    examples it applies to (``None`` where it applies to none)."""
    means: dict[str, float | None] = {}
    for name in METRICS:
        values = [e[name] for e in examples if e.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return {"examples": examples, "means": means}


def score_generations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    chat_format: chat.ChatFormat,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int,
    json_required_keys: Sequence[str] = (),
    keywords: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Generated answers with their metrics: the contract's ``instructions.examples`` rows."""
    rows = generate_answers(
        model, tok, chats, chat_format, max_new_tokens, batch_size, max_prompt_tokens
    )
    return [
        {**row, **example_metrics(row["answer"], row["reference"], json_required_keys, keywords)}
        for row in rows
    ]
