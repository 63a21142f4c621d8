"""Model FLOPs per token: the MFU numerator of the planner, the training loop and the benchmarks.

    FLOPs per token = 6·N + 6·L·q·S

- N: the matmul weights one token goes through. Per decoder layer: the Q, K, V and O
  projections, the MLP of each of the top-k experts it is routed to (gate, up and down; a
  dense model has one "expert"), and the router (every token scores every expert). Plus the LM
  head. Not counted: the input embedding (a row lookup, no multiply-add), the RMSNorm weights
  (elementwise scaling, not a matmul), RoPE, SiLU and the softmax (elementwise). With tied
  embeddings the one matrix is still an LM head matmul, counted once.
- 6 = 2 FLOPs per multiply-add x (forward + input gradient + weight gradient).
- Attention: per layer, QK^T and AV are 2·S·q FLOPs each per token in the forward pass over a
  full S x S score matrix (q = heads x head_dim; GQA shares K and V, not this work), x 3 with
  the backward pass: 12·L·q·S. Causal masking leaves half of the score matrix, which is all
  the flash/flex kernels compute, so this counts 6·L·q·S, the convention of NVIDIA's Megatron
  and NeMo FLOPs calculators (``causal_self_attn``). PaLM (appendix B), torchtitan and
  nanochat count the full matrix, 12·L·q·S (written with d for q): their MFU of the same run is
  higher by 6·L·q·S / (6·N + 6·L·q·S), 11% of ours for the 1.1B Llama at S = 4096.
- Packed documents: attention is counted over the whole block of S tokens, as one causal
  sequence. Documents packed into a block attend only within themselves, so the kernels do
  less than is counted; the count is kept so that figures compare with published ones, which
  count blocks of S tokens too.
- Activation recomputation (checkpointing, the chunked loss's LM head) is not counted: MFU
  measures useful work. ``pipeline.planning.throughput`` adds it to the hardware FLOPs that
  set the step time.
"""

from __future__ import annotations

from pipeline.planning.architecture import Architecture


def layer_matmul_params(arch: Architecture) -> int:
    """Matmul weights of one decoder layer that one token goes through.

    Returns:
        Q, K, V, O projections + experts_per_token expert MLPs + the router (MoE only).
    """
    router = arch.hidden_size * arch.num_experts if arch.num_experts > 1 else 0
    return arch.attention_params() + arch.experts_per_token * arch.expert_params() + router


def matmul_params_per_token(arch: Architecture) -> int:
    """N of ``6·N``: every layer's ``layer_matmul_params`` and the LM head (no input embedding,
    no norms)."""
    return arch.num_layers * layer_matmul_params(arch) + arch.vocab_size * arch.hidden_size


def attention_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """QK^T and AV of every layer, forward and backward, causal: ``6·L·q·S``."""
    return 6.0 * arch.num_layers * arch.q_width * seq_len


def model_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """The MFU numerator per token: ``6·N + 6·L·q·S`` (see the module docstring).

    Args:
        arch: the decoder's dimensions.
        seq_len: tokens per packed block (the causal attention span counted).

    Returns:
        FLOPs per trained token, forward and backward, without recomputation.
    """
    return 6.0 * matmul_params_per_token(arch) + attention_flops_per_token(arch, seq_len)


def layer_forward_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """One decoder layer's forward pass per token (what checkpointing recomputes):
    ``2·N_layer + 2·q·S`` (a third of its share of ``model_flops_per_token``)."""
    return 2.0 * layer_matmul_params(arch) + 2.0 * arch.q_width * seq_len


def lm_head_forward_flops_per_token(arch: Architecture) -> float:
    """The LM head's forward matmul per token, ``2·V·d`` (what the chunked loss recomputes)."""
    return 2.0 * arch.vocab_size * arch.hidden_size
