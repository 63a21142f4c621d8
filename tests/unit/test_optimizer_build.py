"""An optimizer op that cannot be built is reported with its cause and the fix.

The real failure on CUDA 13 images is torch's arch list ("9.0a") breaking DeepSpeed's JIT build
of FusedAdam. Here the same code path (DeepSpeed JIT-building its CPU Adam for optimizer
offload) fails for real: an empty extensions cache and a compiler that always fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from pipeline.config import ComputeConfig, TrainConfig
    from pipeline.devstack.host import free_port
    from pipeline.train.zero import deepspeed_config, initialize_engine, optimizer_param_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    compute = ComputeConfig(zero_stage=2, offload_optimizer=True, precision="fp32")
    config = deepspeed_config(compute, TrainConfig(max_steps=2, lr=1e-3), world_size=1)
    try:
        initialize_engine(model, optimizer_param_groups(model, 0.0), config, None)
    except RuntimeError as err:
        print("REPORTED:", str(err).replace("\\n", " "))
    """
)


@pytest.mark.timeout(300)
def test_a_failed_optimizer_build_names_the_op_the_cause_and_the_fix(tmp_path: Path) -> None:
    # A compiler that reports a version (torch checks it) and then fails every compilation.
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\n[ "$1" = "--version" ] && exec c++ --version\nexit 1\n')
    broken.chmod(0o755)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
        "CXX": str(broken),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=280
    )
    reported = [line for line in done.stdout.splitlines() if line.startswith("REPORTED:")]
    assert reported, done.stdout[-2000:] + done.stderr[-3000:]
    message = reported[0]
    # On CPU workers DeepSpeed builds its shared-memory comm op first, then CPU Adam.
    assert "DeepSpeed could not build its 'deepspeed_shm_comm' op" in message
    assert "Error building extension 'deepspeed_shm_comm'" in message  # the cause, verbatim
    assert "TORCH_CUDA_ARCH_LIST" in message and "'9.0' for H100" in message  # the fix


def test_cpu_info_is_read_once_per_process() -> None:
    """DeepSpeed reads the CPU three times per engine; each read is a subprocess."""
    import cpuinfo

    from pipeline.train.zero import cache_cpu_info

    original = cpuinfo.get_cpu_info
    try:
        cache_cpu_info()
        cache_cpu_info()  # a second wrap would hide the first cache's counts
        first, second = cpuinfo.get_cpu_info(), cpuinfo.get_cpu_info()
        assert first is second and first["arch"]
        assert cpuinfo.get_cpu_info.cache_info().misses == 1
    finally:
        cpuinfo.get_cpu_info = original
