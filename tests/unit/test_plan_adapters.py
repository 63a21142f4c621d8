"""The planner for LoRA and QLoRA: peft's own parameter counts, the QLoRA paper's storage
figures and its headline (a 65B model fine-tuned on one 48 GB GPU), and what adapters change
in the step (no frozen weight gradients, dequantization for QLoRA, a small optimizer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.planning.adapters import (
    ALL_LINEAR,
    Adapter,
    adapter_params,
    frozen_bytes,
    trained_flops_per_token,
)
from pipeline.planning.architecture import Architecture
from pipeline.planning.flops import model_flops_per_token
from pipeline.planning.hardware import POOLS
from pipeline.planning.memory import activation_bytes, estimate_memory, state_bytes
from pipeline.planning.search import candidate_settings, make_plan
from pipeline.planning.throughput import estimate_step
from pipeline.planning.workload import Setting, Workload

LLAMA2_7B = Architecture("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, 128)
LLAMA_65B = Architecture("llama-65b", 32000, 8192, 22016, 80, 64, 64, 128)
ARCH_1B = Architecture("h200-1.1b", 32000, 2048, 8192, 16, 32, 8, 64)
ZERO2 = Setting(2, False, False, True, 4)


def _work(adapter: Adapter, arch: Architecture = ARCH_1B, workers: int = 8) -> Workload:
    return Workload(
        arch=arch,
        pool=POOLS["h100"],
        num_workers=workers,
        cpus_per_worker=8,
        seq_len=4096,
        precision="bf16",
        attention="flash_attention_2",
        blocks_per_worker=8,
        cross_entropy="chunked",
        loss_chunk_tokens=4096,
        adapter=adapter,
    )


def test_adapter_sizes_are_the_ones_peft_prints_for_llama_2_7b() -> None:
    """``print_trainable_parameters`` on Llama-2-7B: r=8 on q_proj and v_proj (peft's
    README), and r=16 on every linear projection."""
    assert LLAMA2_7B.total_params() == 6_738_415_616
    assert adapter_params(LLAMA2_7B, Adapter("lora", 8, ("q_proj", "v_proj"))) == 4_194_304
    assert adapter_params(LLAMA2_7B, Adapter("lora", 16, ALL_LINEAR)) == 39_976_960
    assert adapter_params(LLAMA2_7B, Adapter("full")) == 0


def test_qlora_storage_is_the_papers_nf4_with_double_quantization() -> None:
    """Dettmers et al. 2023: double quantization saves 0.373 bits per parameter, "about 3 GB
    for a 65B model"; NF4 weights take about a quarter of their 16-bit bytes."""
    single = frozen_bytes(LLAMA_65B, Adapter("qlora", double_quant=False), 2)
    double = frozen_bytes(LLAMA_65B, Adapter("qlora", double_quant=True), 2)
    assert (single - double) / 1e9 == pytest.approx(3.0, rel=0.02)
    sixteen_bit = frozen_bytes(LLAMA_65B, Adapter("lora"), 2)
    assert 0.25 < double / sixteen_bit < 0.28  # embeddings and norms stay 16-bit


def test_a_65b_model_fits_one_48_gb_gpu_with_qlora_not_in_16_bits(tmp_path: Path) -> None:
    """The QLoRA paper's headline: LLaMA-65B, r=64 on every projection, one 48 GB GPU. Its
    4-bit weights stay on the GPU (the optimizer state goes to the host, as the paper's paged
    optimizer does); 16-bit LoRA fits only by moving its weights off the GPU (ZeRO-Infinity)
    and full training not at all."""
    config_json = tmp_path / "llama-65b.json"
    config_json.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8192,
                "intermediate_size": 22016,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "vocab_size": 32000,
            }
        )
    )
    config = load_config(
        REPO_ROOT / "configs" / "demo.yaml",
        {
            "model.config_json": str(config_json),
            "compute.pool": "a100",
            "compute.num_workers": 1,
            "compute.gpu_memory_gib": 48,
            "compute.attention": "auto",
            "data.seq_len": 512,
            "sft.micro_batch_size": 1,
            "sft.grad_accum_steps": 16,
        },
    )
    plans = {m: make_plan(config, "sft", Adapter(m, rank=64)) for m in ("full", "lora", "qlora")}
    assert plans["full"].chosen is None
    lora, qlora = plans["lora"].chosen, plans["qlora"].chosen
    assert lora is not None and lora.setting.offload_params
    assert qlora is not None and not qlora.setting.offload_params
    assert qlora.memory.gib("gpu_peak") < 48 * 0.95


def test_adapters_keep_the_frozen_weights_and_train_only_their_own() -> None:
    full, lora, qlora = (_work(Adapter(m)) for m in ("full", "lora", "qlora"))
    states = {w.adapter.method: state_bytes(w, ZERO2)[0] for w in (full, lora, qlora)}
    params = ARCH_1B.total_params()
    # LoRA: the 16-bit weights whole (as ZeRO-2 keeps them for full training too) and the
    # adapter's few states (18 bytes per adapter parameter over 8 GPUs, plus its 16-bit copy).
    assert 2 * params < states["lora"] < 2.05 * params < states["full"]
    assert states["qlora"] < 0.6 * states["lora"]
    # Without dropout the adapters save no more activations than full training.
    no_dropout = _work(Adapter("lora", dropout=0.0))
    assert activation_bytes(no_dropout, ZERO2) == activation_bytes(full, ZERO2)
    assert activation_bytes(lora, ZERO2)[0] > activation_bytes(full, ZERO2)[0]


def test_adapters_skip_the_frozen_weight_gradients_and_qlora_pays_dequantization() -> None:
    full, lora, qlora = (_work(Adapter(m)) for m in ("full", "lora", "qlora"))
    ratio = trained_flops_per_token(ARCH_1B, 4096, Adapter("lora")) / model_flops_per_token(
        ARCH_1B, 4096
    )
    # 4 of 6 FLOPs per frozen weight; the attention's own FLOPs and the adapter's add a little.
    assert 2 / 3 < ratio < 0.75
    steps = {w.adapter.method: estimate_step(w, ZERO2) for w in (full, lora, qlora)}
    assert steps["lora"].step_time_s < steps["full"].step_time_s
    assert steps["qlora"].step_time_s > steps["lora"].step_time_s
    # ZeRO-2 reduces gradients every micro-step: the adapter's, 1% of the parameters here.
    assert steps["lora"].communication_s < 0.02 * steps["full"].communication_s


def test_qlora_is_never_planned_with_parameter_offload() -> None:
    settings = candidate_settings(_work(Adapter("qlora")))
    assert settings and not any(s.offload_params for s in settings)
    assert any(s.offload_params for s in candidate_settings(_work(Adapter("lora"))))


def test_pipeline_plan_compares_the_methods_and_refuses_a_bad_rank() -> None:
    base = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "plan",
        str(REPO_ROOT / "configs" / "llama2-70b-h100.yaml"),
    ]
    out = subprocess.run([*base, "--compare-methods"], capture_output=True, text=True, check=True)
    rows = [line.split()[0] for line in out.stdout.splitlines()[3:6]]
    assert rows == ["full", "lora", "qlora"], out.stdout
    qlora = subprocess.run(
        [*base, "--method", "qlora", "--rank", "64", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    plan = json.loads(qlora.stdout)
    assert plan["method"] == "qlora" and plan["adapter"]["rank"] == 64
    assert plan["adapter"]["trainable_params"] == 4 * 207_093_760
    bad = subprocess.run([*base, "--method", "lora", "--rank", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "adapter rank 0" in bad.stderr
    bad = subprocess.run(
        [*base, "--method", "lora", "--lora-dropout", "1.5"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "adapter dropout 1.5: must be in [0, 1)" in bad.stderr


def test_qlora_under_zero3_holds_the_whole_4bit_model_while_it_loads() -> None:
    """bitsandbytes quantizes onto every GPU before ZeRO-3 partitions (DeepSpeed#5660): the
    load, not training, sets QLoRA's peak of a 70B model on 8 GPUs, above 16-bit LoRA's, which
    partitions as it loads."""
    arch = Architecture("llama-2-70b", 32000, 8192, 28672, 80, 64, 8, 128)
    zero3 = Setting(3, False, False, True, 1)
    qlora = estimate_memory(_work(Adapter("qlora"), arch), zero3)
    lora = estimate_memory(_work(Adapter("lora"), arch), zero3)
    whole_4bit = frozen_bytes(arch, Adapter("qlora"), 2)
    assert qlora.gpu_peak >= whole_4bit
    assert qlora.gpu_peak > lora.gpu_peak


def test_plan_auto_and_the_stage_prediction_read_each_section_s_method() -> None:
    from pipeline.planning.search import apply_plan, predicted_step

    path = REPO_ROOT / "configs" / "llama3-8b-a100.yaml"
    qlora = {"sft.method": "qlora", "sft.adapter.rank": 64, "compute.plan": "auto"}
    config = load_config(path, qlora)
    _, document = apply_plan(config)
    assert document["cpt"]["method"] == "full" and document["cpt"]["adapter"] is None
    assert document["sft"]["method"] == "qlora"
    assert document["sft"]["adapter"]["rank"] == 64
    assert document["sft"]["adapter"]["targets"] == list(ALL_LINEAR)
    full = predicted_step(load_config(path), "sft")
    adapted = predicted_step(config, "sft")
    # The same ZeRO setting (the optimizer is offloaded in both): the 4-bit base and no weight
    # gradients: 17.2 GiB per A100 against full training's 32.7.
    assert adapted["predicted_gpu_memory_gib"] < 0.6 * full["predicted_gpu_memory_gib"]
    # A target the planner cannot size is refused naming the field.
    odd = load_config(path, {"sft.method": "lora", "sft.adapter.target_modules": ["c_attn"]})
    with pytest.raises(Exception, match=r"sft.adapter: adapter targets \['c_attn'\]"):
        predicted_step(odd, "sft")
