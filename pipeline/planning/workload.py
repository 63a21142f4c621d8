"""What is being planned: one model on one pool for one training section, and one setting."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.planning.adapters import Adapter
from pipeline.planning.architecture import Architecture
from pipeline.planning.hardware import Pool


@dataclass(frozen=True)
class Workload:
    """Everything a plan depends on that the plan does not choose."""

    arch: Architecture
    pool: Pool
    num_workers: int
    """Data-parallel ranks (one per GPU)."""
    cpus_per_worker: int
    seq_len: int
    precision: str
    """``bf16`` (mixed precision, fp32 master weights) or ``fp32``."""
    attention: str
    """The kernel that will run: flash_attention_2, flex_attention, sdpa or eager."""
    blocks_per_worker: int
    """micro_batch_size x grad_accum_steps of the section: fixed, the plan only splits it."""
    cross_entropy: str
    """``compute.cross_entropy`` as configured: ``auto``, ``full``, ``chunked`` or ``fused``."""
    loss_chunk_tokens: int
    """Tokens per chunk of the ``chunked`` loss."""
    adapter: Adapter = field(default_factory=Adapter)
    """Full weights (the default), or a LoRA / QLoRA adapter over frozen ones."""

    @property
    def element_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def loss_kernel(self, setting: Setting) -> str:
        """The cross-entropy the trainer runs under ``setting``: ``auto`` is ``fused`` on GPU
        pools below ZeRO-3 (liger reads the whole LM head weight, which ZeRO-3 partitions),
        else ``chunked``."""
        if self.cross_entropy != "auto":
            return self.cross_entropy
        return "fused" if self.pool.has_gpu and setting.zero_stage < 3 else "chunked"


@dataclass(frozen=True)
class Setting:
    """The DeepSpeed choices a plan makes."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    micro_batch_size: int
    checkpoint_every_n_layers: int = 1
    """With ``activation_checkpointing``: layers 0, n, 2n, ... recompute, the others keep their
    activations (``compute.checkpoint_every_n_layers``)."""

    def checkpointed_layers(self, num_layers: int) -> int:
        """Decoder layers that keep only their input and recompute in backward."""
        if not self.activation_checkpointing:
            return 0
        return -(-num_layers // self.checkpoint_every_n_layers)  # layers 0, n, 2n, ...

    def label(self) -> str:
        offload = "+".join(
            name
            for name, on in (("opt", self.offload_optimizer), ("params", self.offload_params))
            if on
        )
        ckpt = "ckpt" if self.activation_checkpointing else "no-ckpt"
        if self.activation_checkpointing and self.checkpoint_every_n_layers > 1:
            ckpt += f" 1/{self.checkpoint_every_n_layers}"
        return f"ZeRO-{self.zero_stage} offload:{offload or 'none'} {ckpt} micro {self.micro_batch_size}"
