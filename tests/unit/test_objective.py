"""The training objective: the loss kernels agree, the LM head is called a fixed number of times,
and a mixture-of-experts model's router loss reaches backward with the config's coefficient."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from pipeline.data.chat import IGNORE_INDEX
from pipeline.train.objective import loss_rows, make_objective, resolve_cross_entropy

SEQ, BATCH, VOCAB = 24, 3, 64


# The decoder both tiny models share (width 32, 2 layers, 4 heads, 2 KV heads).
TINY_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "use_cache": False,
}


def _llama(seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER, intermediate_size=64))


def _mixtral(coef: float, seed: int = 0) -> Any:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        **TINY_DECODER,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=coef,
    )
    return MixtralForCausalLM(config)


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with a padding tail in row 2 and the first half of each row masked."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(BATCH, SEQ))
    ids[2, -5:] = 0
    labels = ids.copy()
    labels[:, : SEQ // 2] = IGNORE_INDEX
    labels[2, -5:] = IGNORE_INDEX
    return ids, labels


def _run(objective: Any, ids: np.ndarray, labels: np.ndarray, chunk: int) -> tuple[Any, Any]:
    import torch

    rows = loss_rows(labels, ids, pad_id=0, chunk_positions=chunk)
    ids_t = torch.as_tensor(ids)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return objective(
        rows=rows,
        index=torch.as_tensor(rows.index),
        targets=torch.as_tensor(rows.targets),
        real_tokens=torch.as_tensor(rows.real_tokens),
        input_ids=ids_t,
        position_ids=positions,
        use_cache=False,
    )


def _reference_loss_sum(model: Any, ids: np.ndarray, labels: np.ndarray) -> Any:
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=torch.as_tensor(ids)).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        torch.as_tensor(labels)[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_loss_rows_cover_every_target_once_in_chunks_fixed_by_positions() -> None:
    ids, labels = _batch()
    rows = loss_rows(labels, ids, pad_id=0, chunk_positions=16)
    # Rows 0 and 1 predict 12 targets each (positions 11..22); row 2 stops before its padding.
    assert rows.n_targets == 12 + 12 + 7
    assert rows.n_real == BATCH * SEQ - 5
    # 72 positions in chunks of 16: 5 chunks whatever the targets.
    assert len(rows.chunk_offsets) == 6
    assert rows.chunk_offsets[0] == 0 and rows.chunk_offsets[-1] == rows.n_targets
    flat_labels = labels[:, 1:]
    assert rows.targets.tolist() == flat_labels[flat_labels != IGNORE_INDEX].tolist()


@pytest.mark.parametrize("chunk", [64, 7, 1000])
def test_chunked_and_full_losses_and_gradients_equal_the_plain_forward(chunk: int) -> None:
    import torch

    ids, labels = _batch()
    reference_model = _llama()
    expected = _reference_loss_sum(reference_model, ids, labels)
    expected.backward()
    for kind in ("full", "chunked"):
        model = _llama()
        ce, aux = _run(make_objective(model, kind, chunk), ids, labels, chunk)
        assert aux.item() == 0.0
        assert ce.item() == pytest.approx(expected.item(), rel=1e-6)
        ce.backward()
        for (name, p), (_, q) in zip(
            model.named_parameters(), reference_model.named_parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=f"{kind} {name}")


def test_chunked_calls_the_lm_head_once_per_chunk_of_positions_even_without_targets() -> None:
    """Under ZeRO-3 each LM-head call gathers its weight in a collective: every rank must call
    it the same number of times, so a micro-batch without a single target calls it too."""
    ids, labels = _batch()
    labels[:] = IGNORE_INDEX
    model = _llama()
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ce, _ = _run(make_objective(model, "chunked", 16), ids, labels, 16)
    assert len(calls) == math.ceil(BATCH * SEQ / 16) == 5
    assert ce.item() == 0.0
    ce.backward()  # still a graph: a rank without targets takes part in backward
    assert model.lm_head.weight.grad is not None


def test_router_loss_is_the_switch_loss_times_real_tokens_and_reaches_the_router() -> None:
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ids, labels = _batch()
    model = _mixtral(coef=0.02)
    _, aux = _run(make_objective(model, "chunked", 32), ids, labels, 32)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), output_router_logits=True)
        mask = torch.as_tensor(ids != 0, dtype=torch.float32)
        switch = load_balancing_loss_func(out.router_logits, 4, 2, mask)
    assert aux.item() == pytest.approx(switch.item() * (BATCH * SEQ - 5), rel=1e-5)
    # E x sum_e (share routed to e) x (mean router prob of e): top_k = 2 when balanced.
    assert 1.5 < switch.item() < 2.5
    router = model.model.layers[0].mlp.gate.weight
    aux.backward()
    assert router.grad is not None and router.grad.abs().sum().item() > 0


def test_dense_models_have_no_router_loss_and_auto_is_chunked_off_cuda() -> None:
    assert make_objective(_llama(), "chunked", 32).aux_coef is None
    assert make_objective(_mixtral(coef=0.01), "chunked", 32).aux_coef == pytest.approx(0.01)
    assert resolve_cross_entropy("auto", "cpu", 2) == "chunked"
    assert resolve_cross_entropy("auto", "cuda", 3) == "chunked"
    with pytest.raises(ValueError, match="liger-kernel"):
        resolve_cross_entropy("fused", "cpu", 1)
