"""DeepSpeed configs built from the pipeline config (no JSON files to keep in sync)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ComputeConfig, TrainConfig


def deepspeed_config(compute: ComputeConfig, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one training stage.

    The optimizer is declared here so DeepSpeed picks its CPU Adam when the optimizer state is
    offloaded; the learning-rate schedule stays in the training loop.
    """
    zero: dict[str, Any] = {"stage": compute.zero_stage}
    if compute.zero_stage == 3:
        zero |= {
            "overlap_comm": compute.pool != "cpu",
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if compute.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": compute.pool != "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": compute.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # Fused GPU Adam cannot build on CPU workers; plain torch AdamW runs there.
                "torch_adam": compute.pool == "cpu" and not compute.offload_optimizer,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
