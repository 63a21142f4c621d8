"""Model FLOPs per token (the MFU numerator) against hand counts, one definition for the planner
and the training loop, and the one table of GPU peaks."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, MixtralConfig

from pipeline.config import REPO_ROOT
from pipeline.planning.architecture import Architecture, from_hf_config
from pipeline.planning.flops import matmul_params_per_token, model_flops_per_token
from pipeline.planning.hardware import gpu_peak_flops, pool_for_device_name
from pipeline.train import throughput

# A tiny decoder: every dimension different, so a swapped factor changes the count.
V, D, FF, LAYERS, HEADS, KV_HEADS, S = 128, 32, 80, 2, 4, 2, 64
HEAD_DIM = D // HEADS
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM


def tiny_llama(**kw: object) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        **kw,
    )


def tiny_mixtral(experts: int, top_k: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
    )


# Per layer: Q (d x q), K and V (d x kv each), O (q x d); SwiGLU gate, up, down (d x ff each).
ATTENTION = D * Q + D * KV + D * KV + Q * D  # 1024 + 512 + 512 + 1024 = 3072
MLP = 3 * D * FF  # 7680
LM_HEAD = V * D  # 4096; the input embedding (another 4096) is a lookup and not counted
CAUSAL_ATTENTION = 6 * LAYERS * Q * S  # QK^T and AV: 2 x 2·S·q forward, x3 with backward, / 2


def test_tiny_llama_flops_per_token_by_hand() -> None:
    n = LAYERS * (ATTENTION + MLP) + LM_HEAD  # 2 x 10752 + 4096 = 25600
    hand = 6 * n + CAUSAL_ATTENTION  # 153600 + 24576
    assert hand == 178_176
    config = tiny_llama()
    arch = from_hf_config(config.to_dict(), "tiny llama")
    assert matmul_params_per_token(arch) == n
    assert model_flops_per_token(arch, S) == hand
    assert throughput.model_flops_per_token(config, S) == hand


def test_tiny_llama_matmul_params_are_the_models_linear_weights_without_embedding() -> None:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    arch = from_hf_config(model.config.to_dict(), "tiny llama")
    assert matmul_params_per_token(arch) == linear == 25_600
    # Everything else the model holds: the embedding and 2 x 2 + 1 RMSNorm weights.
    assert sum(p.numel() for p in model.parameters()) - linear == V * D + (2 * LAYERS + 1) * D


def test_tied_embeddings_still_count_the_lm_head_matmul_once() -> None:
    tied = tiny_llama()
    tied.tie_word_embeddings = True
    untied = tiny_llama()
    assert throughput.model_flops_per_token(tied, S) == throughput.model_flops_per_token(untied, S)
    arch = from_hf_config(tied.to_dict(), "tied")
    assert arch.tied_embeddings
    assert arch.total_params() == LAYERS * (ATTENTION + MLP + 2 * D) + V * D + D


def test_tiny_mixtral_counts_the_top_k_experts_and_the_router() -> None:
    experts, top_k = 4, 2
    router = D * experts  # every token scores every expert: 128
    n = LAYERS * (ATTENTION + top_k * MLP + router) + LM_HEAD  # 2 x 18560 + 4096 = 41216
    hand = 6 * n + CAUSAL_ATTENTION  # 247296 + 24576
    assert hand == 271_872
    config = tiny_mixtral(experts, top_k)
    arch = from_hf_config(config.to_dict(), "tiny mixtral")
    assert model_flops_per_token(arch, S) == hand
    assert throughput.model_flops_per_token(config, S) == hand
    # All four experts are stored, two are computed.
    stored = LAYERS * (ATTENTION + experts * MLP + router + 2 * D) + 2 * V * D + D
    assert arch.total_params() == stored == 76_192


def test_mixtral_8x7b_goes_through_12_7b_matmul_weights_not_46_7b() -> None:
    raw = json.loads((REPO_ROOT / "configs" / "architectures" / "mixtral-8x7b.json").read_text())
    arch = from_hf_config(raw, "mixtral-8x7b")
    d, ff, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    attention = 2 * d * arch.q_width + 2 * d * arch.kv_width
    per_layer = attention + arch.experts_per_token * 3 * d * ff + d * arch.num_experts
    hand = layers * per_layer + arch.vocab_size * d
    assert matmul_params_per_token(arch) == hand
    assert hand == pytest.approx(12.75e9, rel=0.001)
    assert arch.total_params() == pytest.approx(46.70e9, rel=0.001)
    # The old numerator (6 x every parameter + 12·L·d·S) was 3.6x this one at 4096 tokens:
    # (6 x 46.70e9 + 6.44e9) / (6 x 12.75e9 + 3.22e9).
    old = 6 * arch.total_params() + 12 * layers * d * 4096
    assert old / model_flops_per_token(arch, 4096) == pytest.approx(3.60, abs=0.01)


def test_h200_flex_run_mfu_under_the_new_numerator() -> None:
    """The 1.1B Llama's flex run (44,726 tokens/s on one H200): 31.8% MFU, not the 37.2% the
    old numerator (every parameter, non-causal attention) gave."""
    arch = Architecture("h200-1.1b", 32000, 2048, 8192, 16, 32, 8, 64)
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    per_token = 6 * (16 * layer + 32000 * 2048) + 6 * 16 * 2048 * 4096
    assert model_flops_per_token(arch, 4096) == per_token == 7_036_993_536
    assert throughput.mfu(44_726, per_token, "h100") == pytest.approx(0.3182, abs=1e-4)
    old = 6 * arch.total_params() + 12 * 16 * 2048 * 4096
    assert throughput.mfu(44_726, old, "h100") == pytest.approx(0.3725, abs=1e-4)


def test_one_table_of_gpu_peaks() -> None:
    assert gpu_peak_flops("a100") == 312e12
    assert gpu_peak_flops("h100") == 989e12
    assert gpu_peak_flops("h100", "fp32") == 67e12
    assert gpu_peak_flops("cpu") is None
    assert throughput.mfu(1000.0, 1e9, "cpu") is None
    assert throughput.mfu(100_000.0, 3.12e9, "a100") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h100"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L40S", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_pool_for_cuda_device_name(name: str, pool: str | None) -> None:
    assert pool_for_device_name(name) == pool


class _Tokenizer:
    """What ``build_llama``/``build_mixtral`` read from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 512


@pytest.mark.parametrize("architecture", ["llama", "mixtral"])
def test_loop_and_planner_count_the_same_model_alike(architecture: str) -> None:
    """The loop reads the built model's Hugging Face config; the planner the config fields."""
    from pipeline.config import ModelConfig
    from pipeline.planning.architecture import from_model_config
    from pipeline.train.model import build_model

    model_cfg = ModelConfig(name="tiny", vocab_size=512, architecture=architecture)
    model = build_model(model_cfg, _Tokenizer(), 256, seed=0)  # type: ignore[arg-type]
    loop = throughput.model_flops_per_token(model.config, 256)
    assert loop == model_flops_per_token(from_model_config(model_cfg), 256)
    # Defaults: d 128, ff 344, 2 layers, 4 heads, 2 KV heads (q 128, kv 64); Mixtral 2 of 8.
    experts = 2 * 3 * 128 * 344 + 128 * 8 if architecture == "mixtral" else 3 * 128 * 344
    layer = 2 * 128 * 128 + 2 * 128 * 64 + experts
    assert loop == 6 * (2 * layer + 512 * 128) + 6 * 2 * 128 * 256
