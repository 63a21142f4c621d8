"""A tiny Mixtral loaded for training under ZeRO-3 (one CPU rank, gloo): weights partitioned
while loading, embeddings grown for the added chat tokens, MoE blocks registered as leaves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.data.tokenizer import training_tokenizer
from tests.tiny_presets import llama2_style_tokenizer, save_base_model
from tests.trainer_harness import single_rank_group


@pytest.fixture
def single_rank() -> Iterator[None]:
    """A one-process gloo group wrapped by DeepSpeed, torn down so later tests see none."""
    import deepspeed

    with single_rank_group():
        deepspeed.init_distributed(dist_backend="gloo")
        yield


def test_mixtral_under_zero3_has_leaf_moe_blocks_and_grown_embeddings(
    single_rank: None, domain_texts: list[str], tmp_path: Path
) -> None:
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from pipeline.config import TrainConfig
    from pipeline.train.model import count_parameters, load_training_model
    from pipeline.train.zero import deepspeed_config, partition_loaded_model

    base = save_base_model(tmp_path / "base", "mixtral", llama2_style_tokenizer(domain_texts[:300]))
    # Plain torch AdamW: building DeepSpeed's CPU Adam takes minutes and is not under test.
    overrides = {"model.base": str(base), "compute.offload_optimizer": False}
    config = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    training_tokenizer(config, tmp_path / "scratch").save_pretrained(str(tmp_path / "tok"))

    ds_config = deepspeed_config(
        config.compute, TrainConfig(max_steps=2, lr=1e-3, micro_batch_size=2), 1
    )
    hf_ds = HfDeepSpeedConfig(ds_config)  # alive while loading: ZeRO-3 partitions as it loads
    model, _ = load_training_model(base, tmp_path / "tok", "sdpa", torch.float32)
    partition_loaded_model(model, zero_stage=3)
    assert hasattr(model.get_input_embeddings().weight, "ds_id")  # partitioned
    blocks = [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]
    assert len(blocks) == 2
    assert all(getattr(block, "_z3_leaf", False) for block in blocks)
    assert model.config.vocab_size == 602

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=ds_config
    )
    with deepspeed.zero.GatheredParameters(engine.module.get_input_embeddings().weight):
        assert engine.module.get_input_embeddings().weight.shape == (602, 32)
    # 602 x 32 embeddings and LM head, 2 layers of attention, router, 4 experts and norms.
    assert (
        count_parameters(engine.module)
        == 2 * 602 * 32 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 4 * 32 + 4 * 3 * 32 * 64 + 2 * 32) + 32
    )
    ids = torch.randint(0, 602, (2, 16))
    losses = []
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(6.40, abs=0.1)  # ~ln(602) at initialisation
    assert losses[1] < losses[0]
    del hf_ds
