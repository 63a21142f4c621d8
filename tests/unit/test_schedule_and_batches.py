"""Learning-rate schedule, data order, DeepSpeed config and attention selection."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import ComputeConfig, TrainConfig
from pipeline.train import attention
from pipeline.train.attention import select_attention
from pipeline.train.data_order import DataOrder
from pipeline.train.loop import lr_lambda
from pipeline.train.zero import deepspeed_config


def _train(**kwargs: object) -> TrainConfig:
    return TrainConfig.model_validate({"max_steps": 10, "lr": 1e-3, **kwargs})


# --- lr_lambda ---------------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_peak_right_after() -> None:
    factor = lr_lambda(_train(warmup_steps=4, min_lr_ratio=0.1))
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_cosine_decays_to_the_floor_at_max_steps() -> None:
    factor = lr_lambda(_train(warmup_steps=4, min_lr_ratio=0.1))
    # Half-way through the decay (step 7 of 4..10) the cosine is at its mid-point.
    assert factor(7) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert factor(10) == pytest.approx(0.1)
    assert factor(25) == pytest.approx(0.1)  # clamped past max_steps


def test_strictly_decreasing_after_warmup() -> None:
    factor = lr_lambda(_train(max_steps=50, warmup_steps=5, min_lr_ratio=0.05))
    values = [factor(s) for s in range(5, 51)]
    assert values[0] == 1.0
    assert all(a > b for a, b in pairwise(values))
    assert values[-1] == pytest.approx(0.05)


def test_no_warmup_starts_at_peak_and_zero_floor_reaches_zero() -> None:
    factor = lr_lambda(_train(warmup_steps=0, min_lr_ratio=0.0))
    assert factor(0) == 1.0
    assert factor(10) == pytest.approx(0.0, abs=1e-12)


def test_lambda_lr_applies_the_factor_to_the_peak_lr() -> None:
    import torch

    train = _train(max_steps=6, warmup_steps=2, lr=0.5, min_lr_ratio=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    expected = [0.5 / 3, 0.5 * 2 / 3, 0.5]
    expected += [0.5 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in (1, 2, 3)]
    assert seen == pytest.approx(expected)


# --- data order ----------------------------------------------------------------------------


def _batches(n_blocks: int, batch: int, seed: int, count: int) -> list[np.ndarray]:
    order = DataOrder(n_blocks, seed)
    return [order.indices(k * batch, batch) for k in range(count)]


def test_each_epoch_is_a_permutation() -> None:
    batches = _batches(12, 4, seed=0, count=6)
    assert all(b.shape == (4,) and b.dtype == np.int64 for b in batches)
    first, second = np.concatenate(batches[:3]), np.concatenate(batches[3:])
    assert sorted(first.tolist()) == list(range(12))
    assert sorted(second.tolist()) == list(range(12))
    assert first.tolist() != second.tolist()  # a fresh order every epoch


def test_same_seed_same_order_and_different_seed_different_order() -> None:
    a = np.concatenate(_batches(100, 10, seed=7, count=20))
    b = np.concatenate(_batches(100, 10, seed=7, count=20))
    c = np.concatenate(_batches(100, 10, seed=8, count=20))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_epochs_run_on_seamlessly_when_batch_does_not_divide() -> None:
    indices = np.concatenate(_batches(10, 4, seed=1, count=5))
    assert np.bincount(indices, minlength=10).tolist() == [2] * 10


def test_batch_larger_than_the_dataset_still_works() -> None:
    batches = _batches(3, 5, seed=0, count=3)
    assert all(len(b) == 5 for b in batches)
    assert np.bincount(np.concatenate(batches), minlength=3).tolist() == [5, 5, 5]


def test_every_seed_the_config_accepts_works() -> None:
    try:
        train = _train(seed=-1)
    except ValidationError:
        return  # rejected up front with a field name: also fine
    assert len(DataOrder(8, train.seed).indices(0, 4)) == 4


# --- deepspeed_config --------------------------------------------------------------------


def test_zero3_offload_bf16_on_gpus() -> None:
    compute = ComputeConfig(pool="h100", zero_stage=3, offload_optimizer=True, precision="bf16")
    train = _train(micro_batch_size=2, grad_accum_steps=8, lr=3e-4, weight_decay=0.1, grad_clip=0.5)
    cfg = deepspeed_config(compute, train, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 8
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 3e-4,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.1,
            "torch_adam": False,
        },
    }


def test_zero2_without_offload_fp32_on_cpu() -> None:
    compute = ComputeConfig(pool="cpu", zero_stage=2, offload_optimizer=False, precision="fp32")
    cfg = deepspeed_config(compute, _train(micro_batch_size=4, grad_accum_steps=1), world_size=2)
    assert cfg["train_batch_size"] == 8
    assert cfg["zero_optimization"] == {"stage": 2}  # no offload, no stage-3 keys
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["optimizer"]["params"]["torch_adam"] is True


def test_cpu_offload_uses_deepspeed_cpu_adam_without_pinned_memory() -> None:
    compute = ComputeConfig(pool="cpu", zero_stage=3, offload_optimizer=True, precision="fp32")
    cfg = deepspeed_config(compute, _train(micro_batch_size=4, grad_accum_steps=3), world_size=2)
    assert cfg["train_batch_size"] == 24
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cfg["zero_optimization"]["overlap_comm"] is False
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["optimizer"]["params"]["torch_adam"] is False


# --- select_attention --------------------------------------------------------------------


@pytest.mark.skipif(attention.flash_attention_available(), reason="this machine has flash-attn")
def test_auto_is_sdpa_per_document_on_this_machine() -> None:
    assert select_attention("auto") == attention.DOCUMENT_SDPA


@pytest.mark.skipif(attention.flash_attention_available(), reason="this machine has flash-attn")
def test_explicit_flash_attention_without_it_names_the_config_field() -> None:
    with pytest.raises(ValueError, match=r"compute\.attention=flash_attention_2 needs a CUDA"):
        select_attention("flash_attention_2")


def test_auto_picks_flash_attention_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_attention_available", lambda: True)
    assert select_attention("auto") == "flash_attention_2"
    assert select_attention("flash_attention_2") == "flash_attention_2"
    monkeypatch.setattr(attention, "flash_attention_available", lambda: False)
    assert select_attention("auto") == attention.DOCUMENT_SDPA


@pytest.mark.parametrize(
    ("requested", "loaded"), [("sdpa", attention.DOCUMENT_SDPA), ("eager", "eager")]
)
def test_explicit_kernels_pass_through(requested: str, loaded: str) -> None:
    assert select_attention(requested) == loaded
