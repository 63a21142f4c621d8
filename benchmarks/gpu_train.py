"""GPU training throughput and MFU of the project's trainer, one GPU, a matrix of settings.

Runs ``pipeline.train.loop.train_worker`` itself (the code every Ray Train worker runs) in this
process, with a torch.distributed group of world size 1 that this script starts (nccl on CUDA,
gloo on CPU). Everything it trains on is built locally, nothing is downloaded:

- a word-level tokenizer with one token per id (only its files are needed: the loop saves it
  next to the trained weights),
- a freshly initialised Llama-architecture model written with ``save_pretrained``,
- synthetic documents of variable length (about 4.3 per block) packed by
  by ``pipeline.data.pack.DocumentPacker`` into ``pipeline.data.shards.ShardWriter`` shards with
  a manifest, exactly as prepare_data's assembly writes them.

It then checks that a packed multi-row batch gives the same logits as every document run alone,
for each attention kernel the machine can run, and reports the largest difference.

    python benchmarks/gpu_train.py                  # CUDA: 0.85B Llama, seq 4096, bf16, 12 steps
    python benchmarks/gpu_train.py --small          # CPU: tiny model, same code path, < 1 min

Prints a Markdown table and writes JSON (default ``benchmarks/results/gpu_train.json``, or
``gpu_train_small.json`` with ``--small``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import REPO_ROOT, ComputeConfig, PipelineConfig, load_config
from pipeline.data import shards
from pipeline.data.pack import BlockBuffer, DocumentPacker, PackedBlocks

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
RESULTS = REPO_ROOT / "benchmarks" / "results"
SPLIT = "cpt_train"
DOCS_PER_BLOCK = 4.3
"""Target number of packed segments (documents or document pieces) per block."""

# Dense bf16 peak FLOP/s per GPU, without sparsity (NVIDIA data sheets, SXM parts).
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


@dataclass(frozen=True)
class Shape:
    """Model, data and run size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int
    seq_len: int
    steps: int
    precision: str
    """``bf16`` on GPUs; ``fp32`` on CPU (the CPU path checks arithmetic, not speed)."""
    micro_divisor: int
    """Each setting's micro batch is divided by this (``--small`` keeps CPU steps short)."""


# The shape the issue asked for. Note: it has 0.85B parameters; TinyLlama-1.1B is the same
# widths with 22 layers and 4 KV heads (``--layers 22 --kv-heads 4`` gives 1.10B).
GPU_SHAPE = Shape(2048, 16, 32, 8, 32000, 5632, 4096, 12, "bf16", 1)
SMALL_SHAPE = Shape(64, 2, 4, 2, 512, 172, 128, 3, "fp32", 4)


@dataclass(frozen=True)
class Setting:
    """One row of the matrix."""

    key: str
    micro: int
    """Packed blocks per forward pass (before ``Shape.micro_divisor``)."""
    zero_stage: int
    offload_optimizer: bool = False
    checkpointing: bool = False
    attention: str = "sdpa"


SETTINGS = (
    Setting("z2-sdpa", 4, 2),
    Setting("z2-sdpa-ckpt", 8, 2, checkpointing=True),
    Setting("z3-sdpa-ckpt", 8, 3, checkpointing=True),
    Setting("z3-offload-sdpa-ckpt", 8, 3, offload_optimizer=True, checkpointing=True),
    Setting("z2-flex-ckpt", 8, 2, checkpointing=True, attention="flex_attention"),
    Setting("z2-flash-ckpt", 8, 2, checkpointing=True, attention="flash_attention_2"),
    # Lever: does the memory checkpointing saves buy a larger micro batch worth its recompute?
    Setting("z2-sdpa-micro8", 8, 2),
)
EQUALITY_KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def skip_reason(attention: str, cuda: bool) -> str | None:
    """Why an attention kernel cannot run here, or ``None`` when it can."""
    accepted = typing.get_args(ComputeConfig.model_fields["attention"].annotation)
    if attention not in accepted:
        return f"compute.attention does not accept {attention!r} yet (pipeline/config.py)"
    if attention == "flex_attention" and not cuda:
        return "flex_attention is measured on CUDA only (on CPU it needs torch.compile'd kernels)"
    if attention == "flash_attention_2":
        if not cuda:
            return "flash_attention_2 needs CUDA"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install flash-attn)"
    return None


def device_facts() -> dict[str, Any]:
    """CUDA device name, capability and bf16 peak (``None`` on CPU or an unknown GPU)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": platform.processor() or "cpu", "peak_flops": None}
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return {"cuda": True, "name": name, "capability": f"{major}.{minor}", "peak_flops": peak}


def set_cuda_arch(facts: dict[str, Any]) -> None:
    """Pin ``TORCH_CUDA_ARCH_LIST`` to this GPU before DeepSpeed JIT-builds FusedAdam.

    Unset, torch derives "9.0a" on Hopper, which DeepSpeed's op builder cannot parse.
    """
    if facts["cuda"] and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = facts["capability"]


def init_process_group(cuda: bool) -> None:
    """A world-size-1 default group, as Ray Train would have started it for one worker."""
    import torch
    import torch.distributed as dist

    from pipeline.localstack import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


# --- inputs: tokenizer, model, packed data -----------------------------------------------------


def write_tokenizer(vocab: int, out: Path) -> Any:
    """A word-level tokenizer whose ids 0-2 are BOS/EOS/PAD and every other id is a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.tokenizer import BOS, EOS, PAD

    words = {BOS: 0, EOS: 1, PAD: 2} | {f"t{i}": i for i in range(3, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tok.save_pretrained(str(out))
    return tok


def write_model(config: PipelineConfig, tok: Any, out: Path, cuda: bool) -> int:
    """Initialise the model from the config (on the GPU when there is one) and save it.

    Returns:
        Its parameter count.
    """
    import torch

    from pipeline.train.model import build_llama

    dtype = torch.bfloat16 if config.compute.precision == "bf16" else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = build_llama(config.model, tok, config.data.seq_len, config.cpt.seed)
    model.to(dtype)  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return n_params


def synthetic_documents(shape: Shape, n_blocks: int, seed: int) -> list[np.ndarray]:
    """Random documents whose lengths average ``DOCS_PER_BLOCK`` segments per packed block.

    A block boundary splits one document into two segments, so documents average
    ``seq_len / (DOCS_PER_BLOCK - 1)`` tokens (EOS included), drawn uniformly in [1/4, 7/4] of it.
    """
    rng = np.random.default_rng(seed)
    mean = shape.seq_len / (DOCS_PER_BLOCK - 1)
    docs: list[np.ndarray] = []
    total = 0
    while total < n_blocks * shape.seq_len:
        length = max(1, int(rng.integers(int(mean / 4), int(mean * 7 / 4))) - 1)
        docs.append(rng.integers(3, shape.vocab, size=length))
        total += length + 1
    return docs


def write_data(
    docs: list[np.ndarray], data_dir: Path, shape: Shape, eos_id: int, pad_id: int
) -> PackedBlocks:
    """Pack ``docs`` into a ``cpt_train`` split with a manifest, the way prepare_data's assembly
    does (``DocumentPacker`` -> ``BlockBuffer`` -> ``ShardWriter``); returns the split as read
    back by the trainer's own reader."""
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = shards.token_dtype(shape.vocab)
    writer = shards.ShardWriter(data_dir, SPLIT, 4096, dtype)
    buffer = BlockBuffer(shape.seq_len, pad_id, writer, rows=256, dtype=dtype)
    packer = DocumentPacker(buffer, eos_id)
    for doc in docs:
        packer.add(doc)
    buffer.close()
    manifest = {
        "format": shards.FORMAT,
        "seq_len": shape.seq_len,
        "vocab_size": shape.vocab,
        "token_dtype": dtype.name,
        "splits": {SPLIT: writer.close()},
    }
    storage.write_json(str(data_dir / shards.MANIFEST_FILE), manifest)
    return shards.read_split(str(data_dir), manifest, SPLIT)


# --- one training run per setting --------------------------------------------------------------


def bench_config(
    workdir: Path, shape: Shape, setting: Setting, facts: dict[str, Any]
) -> PipelineConfig:
    """The demo config resized to ``shape`` and set to ``setting``, for one worker."""
    pool = "cpu" if not facts["cuda"] else "a100" if "A100" in facts["name"] else "h100"
    overrides: dict[str, Any] = {
        "data.seq_len": shape.seq_len,
        "model.vocab_size": shape.vocab,
        "model.hidden_size": shape.hidden,
        "model.intermediate_size": shape.intermediate,
        "model.num_layers": shape.layers,
        "model.num_heads": shape.heads,
        "model.num_kv_heads": shape.kv_heads,
        "cpt.max_steps": shape.steps,
        "cpt.micro_batch_size": max(1, setting.micro // shape.micro_divisor),
        "cpt.grad_accum_steps": 1,
        "cpt.warmup_steps": 0,
        "cpt.log_every": shape.steps,
        # The loop always checkpoints after the last step; no earlier ones inside the timing.
        "cpt.checkpoint_every": shape.steps,
        "cpt.keep_last": 1,
        "compute.pool": pool,
        "compute.num_workers": 1,
        # The CPU optimizer of the offload row uses these threads; on CPU runs, stay on one core.
        "compute.cpus_per_worker": os.cpu_count() if facts["cuda"] else 1,
        "compute.zero_stage": setting.zero_stage,
        "compute.offload_optimizer": setting.offload_optimizer,
        "compute.precision": shape.precision,
        "compute.attention": setting.attention,
        "compute.activation_checkpointing": setting.checkpointing,
        "storage.artifact_root": str(workdir / "artifacts"),
    }
    return load_config(DEMO_CONFIG, overrides)


def optimizer_name(config: PipelineConfig) -> str:
    """The optimizer ``pipeline.train.zero.deepspeed_config`` makes DeepSpeed build."""
    if config.compute.offload_optimizer:
        return "DeepSpeedCPUAdam"
    return "torch AdamW" if config.compute.pool == "cpu" else "FusedAdam"


def train_setting(
    workdir: Path, inputs: dict[str, str], config: PipelineConfig, key: str
) -> dict[str, Any]:
    """One ``train_worker`` call; returns its train_metrics.json plus wall time and peak memory."""
    import torch

    from pipeline.train.loop import TRAIN_METRICS_FILE, train_worker

    output_uri = str(workdir / "runs" / key / "model")
    spec: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "section": "cpt",
        "model_uri": inputs["model"],
        "tokenizer_uri": inputs["tokenizer"],
        "data_uri": inputs["data"],
        "split": SPLIT,
        "output_uri": output_uri,
        "checkpoint_uri": str(workdir / "runs" / key / "checkpoints"),
        "mlflow_run_id": "",  # no MLflow: the GPU machine has no tracking server
    }
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train_worker(spec)
    wall_s = time.perf_counter() - started
    metrics: dict[str, Any] = storage.read_json(storage.join(output_uri, TRAIN_METRICS_FILE))
    metrics["wall_s"] = round(wall_s, 1)
    metrics["measured_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # Weights of every row would fill the disk at full size; the metrics are all we keep.
    shutil.rmtree(workdir / "runs" / key, ignore_errors=True)
    return metrics


def flops_per_token(shape: Shape, n_params: int) -> float:
    """6 N + 12 L d S with the loop's own definition (``pipeline.train.throughput``: N counts
    every parameter), so the MFU column and the loop's ``mfu`` metric agree."""
    from pipeline.train.throughput import flops_per_token as loop_flops_per_token

    return loop_flops_per_token(n_params, shape.layers, shape.hidden, shape.seq_len)


def result_row(
    setting: Setting,
    config: PipelineConfig,
    metrics: dict[str, Any],
    facts: dict[str, Any],
    flops: float,
) -> dict[str, Any]:
    """One table row from the loop's metrics."""
    tokens_per_s = float(metrics["tokens_per_s"])
    peak = metrics.get("peak_memory_gib", metrics["measured_peak_gib"])
    return {
        "setting": setting.key,
        "status": "ok",
        "micro": config.cpt.micro_batch_size,
        "zero_stage": config.compute.zero_stage,
        "offload_optimizer": config.compute.offload_optimizer,
        "activation_checkpointing": config.compute.activation_checkpointing,
        "attention": metrics.get("attention", setting.attention),
        "optimizer": optimizer_name(config),
        "tokens_per_s": round(tokens_per_s, 1),
        "target_tokens_per_s": metrics.get("target_tokens_per_s"),
        "mfu": tokens_per_s * flops / facts["peak_flops"] if facts["peak_flops"] else None,
        "loop_mfu": metrics.get("mfu"),
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
        "first_loss": round(metrics["first_loss"], 5),
        "final_loss": round(metrics["final_loss"], 5),
        "steps": metrics["steps"],
        "wall_s": metrics["wall_s"],
    }


def run_matrix(
    workdir: Path,
    inputs: dict[str, str],
    shape: Shape,
    settings: tuple[Setting, ...],
    facts: dict[str, Any],
    n_params: int,
) -> list[dict[str, Any]]:
    """Train every setting that can run here; the others get a row that says why not.

    A setting that fails (out of memory, a kernel error) is reported with its error and the
    matrix goes on: one bad lever must not cost the device time of the others.
    """
    import torch

    rows = []
    flops = flops_per_token(shape, n_params)
    for setting in settings:
        reason = skip_reason(setting.attention, facts["cuda"])
        if reason:
            rows.append({"setting": setting.key, "status": "skipped", "reason": reason})
            print(f"{setting.key}: skipped ({reason})", flush=True)
            continue
        config = bench_config(workdir, shape, setting, facts)
        try:
            metrics = train_setting(workdir, inputs, config, setting.key)
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:
            rows.append({"setting": setting.key, "status": "failed", "reason": repr(err)[:500]})
            print(f"{setting.key}: FAILED {err!r}", flush=True)
        else:
            rows.append(result_row(setting, config, metrics, facts, flops))
            print(f"{setting.key}: {rows[-1]['tokens_per_s']} tokens/s", flush=True)
        gc.collect()
        if facts["cuda"]:
            torch.cuda.empty_cache()
    return rows


# --- packed versus per-document logits ---------------------------------------------------------


def packed_equality(
    model_dir: str, blocks: PackedBlocks, rows: int, facts: dict[str, Any], precision: str
) -> dict[str, dict[str, Any]]:
    """Largest |logit difference| between a packed ``rows``-row batch and each segment alone.

    Returns:
        Per kernel: ``max_abs_diff`` and ``segments``; or ``skipped`` with a reason.
    """
    import torch

    from pipeline.train.attention import packed_model_inputs
    from pipeline.train.model import load_causal_lm

    device = "cuda" if facts["cuda"] else "cpu"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_causal_lm(model_dir, "sdpa", dtype).eval()
    model.to(device)
    ids = torch.as_tensor(blocks.input_ids[:rows], dtype=torch.long, device=device)
    pos = torch.as_tensor(blocks.position_ids[:rows], dtype=torch.long, device=device)
    out: dict[str, dict[str, Any]] = {}
    for kernel in EQUALITY_KERNELS:
        reason = skip_reason(kernel, facts["cuda"]) if kernel != "eager" else None
        if reason:
            out[kernel] = {"skipped": reason}
            continue
        model.set_attn_implementation(kernel)
        kwargs = packed_model_inputs(ids, pos, kernel)
        with torch.no_grad():
            packed = model(**kwargs).logits.reshape(ids.shape[0], ids.shape[1], -1).float()
            worst, segments = 0.0, 0
            for row in range(ids.shape[0]):
                starts = [*torch.nonzero(pos[row] == 0).flatten().tolist(), ids.shape[1]]
                for start, end in itertools.pairwise(starts):
                    alone = (
                        model(
                            input_ids=ids[row : row + 1, start:end],
                            position_ids=pos[row : row + 1, start:end],
                        )
                        .logits[0]
                        .float()
                    )
                    worst = max(worst, (packed[row, start:end] - alone).abs().max().item())
                    segments += 1
        out[kernel] = {"max_abs_diff": worst, "segments": segments}
    del model
    return out


# --- report ------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | optimizer | micro | tokens/s | MFU | peak GPU memory (GiB) "
        "| loss first → final |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['status']}: {r['reason']} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {r['setting']} | {r['optimizer']} | {r['micro']} | {r['tokens_per_s']:.0f} "
            f"| {mfu} | {peak} | {r['first_loss']:.4f} → {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def equality_table(check: dict[str, dict[str, Any]]) -> str:
    lines = ["| kernel | max abs diff packed vs alone | segments |", "|---|---:|---:|"]
    for kernel, r in check.items():
        if "skipped" in r:
            lines.append(f"| {kernel} | skipped: {r['skipped']} | |")
        else:
            lines.append(f"| {kernel} | {r['max_abs_diff']:.2e} | {r['segments']} |")
    return "\n".join(lines)


def environment(facts: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    deepspeed = sys.modules.get("deepspeed")
    return {
        "device": facts["name"],
        "capability": facts.get("capability"),
        "peak_bf16_flops": facts["peak_flops"],
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": getattr(deepspeed, "__version__", None),
        "transformers": transformers.__version__,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny fp32 model on CPU, 3 steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per setting")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (16)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (8)")
    parser.add_argument(
        "--settings", default=None, help="comma-separated setting keys (default: all)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU peak")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the inputs here")
    return parser.parse_args(argv)


def chosen(args: argparse.Namespace) -> tuple[Shape, tuple[Setting, ...]]:
    """The shape and settings the command line asks for."""
    shape = SMALL_SHAPE if args.small else GPU_SHAPE
    shape = dataclasses.replace(
        shape,
        steps=args.steps or shape.steps,
        layers=args.layers or shape.layers,
        kv_heads=args.kv_heads or shape.kv_heads,
    )
    if not args.settings:
        return shape, SETTINGS
    keys = args.settings.split(",")
    unknown = sorted(set(keys) - {s.key for s in SETTINGS})
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known {[s.key for s in SETTINGS]}")
    return shape, tuple(s for s in SETTINGS if s.key in keys)


def build_inputs(
    workdir: Path, shape: Shape, facts: dict[str, Any]
) -> tuple[dict[str, str], int, PackedBlocks]:
    """Tokenizer, model and data folders; returns their paths, the parameter count, the blocks."""
    config = bench_config(workdir, shape, SETTINGS[0], facts)
    inputs = {name: str(workdir / name) for name in ("tokenizer", "model", "data")}
    tok = write_tokenizer(shape.vocab, Path(inputs["tokenizer"]))
    n_params = write_model(config, tok, Path(inputs["model"]), facts["cuda"])
    n_blocks = max(s.micro for s in SETTINGS) * shape.steps
    docs = synthetic_documents(shape, n_blocks, seed=0)
    blocks = write_data(docs, Path(inputs["data"]), shape, tok.eos_token_id, tok.pad_token_id)
    return inputs, n_params, blocks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape, settings = chosen(args)
    facts = device_facts()
    if args.peak_tflops:
        facts["peak_flops"] = args.peak_tflops * 1e12
    if not facts["cuda"] and not args.small:
        raise SystemExit("no CUDA device: run with --small for the CPU check of this code path")
    set_cuda_arch(facts)
    import torch.distributed

    out = args.out or RESULTS / ("gpu_train_small.json" if args.small else "gpu_train.json")
    started = time.perf_counter()
    init_process_group(facts["cuda"])
    with tempfile.TemporaryDirectory() as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        inputs, n_params, blocks = build_inputs(workdir, shape, facts)
        inputs_s = round(time.perf_counter() - started, 1)
        print(f"inputs built in {inputs_s} s: {n_params:,} parameters", flush=True)
        rows = run_matrix(workdir, inputs, shape, settings, facts, n_params)
        check = packed_equality(inputs["model"], blocks, 2, facts, shape.precision)
    torch.distributed.destroy_process_group()
    # The last block is mostly padding (one more segment); it is left out of the average.
    segments = float((blocks.position_ids[: len(blocks) - 1] == 0).sum()) / (len(blocks) - 1)
    report = {
        "benchmark": "gpu_train",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["benchmarks/gpu_train.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "shape": dataclasses.asdict(shape),
        "parameters": n_params,
        "flops_per_token": flops_per_token(shape, n_params),
        "segments_per_block": round(segments, 2),
        "environment": environment(facts),
        "inputs_s": inputs_s,
        "results": rows,
        "packed_equality": check,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(rows))
    print()
    print(equality_table(check))
    print(
        f"\n{n_params:,} parameters, {segments:.2f} segments per block, "
        f"total {report['total_wall_s']} s; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
