"""The plan as a console table."""

from __future__ import annotations

from pipeline.planning.adapters import adapter_params
from pipeline.planning.flops import model_flops_per_token
from pipeline.planning.search import Plan, Prediction
from pipeline.planning.workload import Setting


def _checkpointing(s: Setting) -> str:
    """``no``, ``all`` layers, or the share of layers checkpointed (``1/2``: every 2nd)."""
    if not s.activation_checkpointing:
        return "no"
    return "all" if s.checkpoint_every_n_layers == 1 else f"1/{s.checkpoint_every_n_layers}"


def _row(p: Prediction, has_gpu: bool, mark: str) -> str:
    s, m, t = p.setting, p.memory, p.step
    offload = "+".join(
        n for n, on in (("opt", s.offload_optimizer), ("param", s.offload_params)) if on
    )
    gpu = f"{m.gib('gpu_peak'):7.1f}" if has_gpu else "      -"
    return (
        f"{mark:1} {s.zero_stage:>4} {offload or '-':>9} {_checkpointing(s):>4} "
        f"{p.loss_kernel:>7} {s.micro_batch_size:>5} {gpu} {m.gib('host_peak'):8.1f} "
        f"{'yes' if p.fits else 'NO':>4} {t.step_time_s:9.3g} {t.tokens_per_s:10.4g} "
        f"{t.mfu:6.1%}  {p.why}"
    )


def format_plan(plan: Plan, limit: int | None = 12) -> str:
    """Header (model, pool), configured setting, then the candidates, fitting and fastest first.

    Args:
        plan: a plan from ``make_plan``.
        limit: candidates shown (the chosen one is always among them); ``None`` shows all.
    """
    work, arch, pool = plan.work, plan.work.arch, plan.work.pool
    has_gpu = pool.has_gpu
    device = f"{pool.device_memory_gib:g} GiB GPUs" if has_gpu else "CPU workers"
    lines = [
        f"model {arch.name}: {arch.total_params() / 1e9:.2f}B params "
        f"({arch.active_params() / 1e9:.2f}B active), {arch.num_layers} layers, d {arch.hidden_size}, "
        f"vocab {arch.vocab_size}; seq_len {work.seq_len}, {work.precision}, {work.attention}; "
        f"{model_flops_per_token(arch, work.seq_len) / 1e9:.3g} GFLOP per token (MFU numerator)",
        f"pool {pool.name}: {pool.num_nodes} node(s) x {pool.devices_per_node} {device}, "
        f"{pool.host_memory_gib:.0f} GiB RAM per node; {work.num_workers} workers; "
        f"section {plan.section}: {work.blocks_per_worker} block(s) per worker per step",
        "",
        "  zero   offload ckpt    loss micro GPU GiB host GiB fits    step s   tokens/s    MFU  why",
    ]
    lines.append(_row(plan.configured, has_gpu, "c"))
    shown = plan.candidates if limit is None else plan.candidates[:limit]
    lines.append("  " + "-" * 86)
    lines += [_row(p, has_gpu, "*" if p is plan.chosen else " ") for p in shown]
    if limit is not None and len(plan.candidates) > limit:
        lines.append(f"  ... {len(plan.candidates) - limit} more (--all or --json)")
    lines.append("")
    if plan.chosen is None:
        least = min(plan.candidates, key=lambda p: p.memory.gpu_peak + p.memory.host_peak)
        lines.append(f"no candidate fits; the smallest ({least.setting.label()}): {least.why}")
    else:
        lines.append(f"chosen (*): {plan.chosen.setting.label()}; c = as configured")
    return "\n".join(lines)


def format_methods(plans: dict[str, Plan]) -> str:
    """One row per training method (full, LoRA, QLoRA): the plan each gets on the same model,
    pool and section, with its trainable parameters, memory, step time and MFU.

    Args:
        plans: ``make_plan`` of one config and section per method, keyed by method.
    """
    work = next(iter(plans.values())).work
    arch, pool = work.arch, work.pool
    lines = [
        f"model {arch.name}: {arch.total_params() / 1e9:.2f}B params; pool {pool.name}: "
        f"{work.num_workers} workers, {pool.device_memory_gib:g} GiB per GPU; seq_len "
        f"{work.seq_len}, {work.blocks_per_worker} block(s) per worker per step",
        "",
        "method  rank  trainable  zero   offload ckpt micro GPU GiB host GiB    step s"
        "   tokens/s    MFU",
    ]
    for method, plan in plans.items():
        adapter = plan.work.adapter
        trained = (
            arch.total_params() if adapter.trains_full_weights else adapter_params(arch, adapter)
        )
        rank = "-" if adapter.trains_full_weights else str(adapter.rank)
        p = plan.chosen
        head = f"{method:<6} {rank:>5} {trained / 1e9:9.3f}B"
        if p is None:
            least = min(plan.candidates, key=lambda c: c.memory.gpu_peak + c.memory.host_peak)
            lines.append(f"{head}  nothing fits: {least.why}")
            continue
        s, m, t = p.setting, p.memory, p.step
        offload = "+".join(
            n for n, on in (("opt", s.offload_optimizer), ("param", s.offload_params)) if on
        )
        gpu = f"{m.gib('gpu_peak'):7.1f}" if pool.has_gpu else "      -"
        lines.append(
            f"{head} {s.zero_stage:>5} {offload or '-':>9} {_checkpointing(s):>4} "
            f"{s.micro_batch_size:>5} {gpu} {m.gib('host_peak'):8.1f} {t.step_time_s:9.3g} "
            f"{t.tokens_per_s:10.4g} {t.mfu:6.1%}"
        )
    lines += [
        "",
        "MFU counts the FLOPs each method needs: adapters skip the frozen weights' gradients.",
    ]
    return "\n".join(lines)
