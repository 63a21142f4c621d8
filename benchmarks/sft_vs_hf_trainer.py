"""SFT throughput: the project's packed trainer against the Hugging Face ``Trainer``.

On a generated instruction set with heavy-tailed lengths (log-normal answers, prompts of one
sentence or a paragraph, a system turn on some): ``prepare_data`` packs it into 2048-token
blocks, a short ``continued_pretraining`` gives the model it starts from, and the project's
``instruction_finetuning`` (packed blocks) runs against the Hugging Face ``Trainer`` with the same
DeepSpeed config on the same examples, padded per batch, both on 2 Ray Train workers, with about
as many examples per optimizer step. ``sft_comparison`` returns the ratio of their target
tokens/s (trained labels only) and the padding figures behind it; ``train_throughput.py`` runs
it after the ZeRO matrix and prints ``sft_table``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Run from a script in this folder, which is on sys.path: the chat text of the data-prep benchmark.
from data_prep import _paragraph, _sentence
from stage_runs import WARMUP_STEPS, PeakRss, bench_config, run_stage

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data.chat import IGNORE_INDEX

HF_METRICS_FILE = "hf_metrics.json"
# SFT comparison data: its own prepare_data run (the CPT rows keep the demo data and 256 tokens).
SFT_DATA_RUN_KEY = "bench-sft-data"
SFT_BASE_RUN_KEY = "bench-sft-base"
SFT_CHATS = 1000
SFT_DATA_SEED = 0
SFT_SEQ_LEN = 2048
"""Covers the generated chats to p99 (1795 tokens); 1024 would cut 7% of them."""
SFT_STEPS = 20
"""SFT steps per run: a step holds a few examples, and over fewer steps the figures follow
which ones were drawn more than the trainer."""
SFT_BLOCKS_PER_MICRO = 1
"""Packed blocks per worker per micro-batch; the HF Trainer gets that many blocks' worth of
examples (the mean per ``sft_train`` block, rounded)."""
SFT_ANSWER_MEDIAN_WORDS = 55
"""Median answer: ~150 tokens (the demo's 1024-entry BPE splits this text ~2.8 tokens a word)."""
SFT_ANSWER_SIGMA = 0.9
"""Log-normal spread of answer lengths: 1 answer in 20 is 4.4x the median, 1 in 100 8x."""
SFT_SYSTEM = "You are a concise support agent for a food delivery app."
SFT_RATIO_FLOOR = 1.5
"""The issue's floor for packed / HF Trainer target tokens/s (best run of each)."""


# --- SFT data: chats with the length spread of real instruction sets -------------------------


def sft_answer(rng: np.random.Generator) -> str:
    """One answer of log-normal length: whole sentences until the drawn word count is reached,
    four sentences to a paragraph. The shortest is one sentence (6-21 words)."""
    target = rng.lognormal(np.log(SFT_ANSWER_MEDIAN_WORDS), SFT_ANSWER_SIGMA)
    sentences: list[str] = []
    words = 0
    while words < target:
        sentences.append(_sentence(rng))
        words += len(sentences[-1].split())
    return "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


def write_sft_chats(path: Path, n: int, seed: int) -> Path:
    """``n`` support chats as JSONL ``{"messages": [...]}``; returns ``path``.

    Answers are log-normal (``sft_answer``). A prompt is one sentence (half) or a paragraph of
    2-7 sentences, now and then with an e-mail, a card number or code (``data_prep._paragraph``).
    30% of the chats open with a system turn, 20% have a follow-up question and answer.
    """
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for _ in range(n):
            messages = [{"role": "system", "content": SFT_SYSTEM}] if rng.random() < 0.3 else []
            for _ in range(2 if rng.random() < 0.2 else 1):
                prompt = _sentence(rng) if rng.random() < 0.5 else _paragraph(rng)
                messages += [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": sft_answer(rng)},
                ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def sft_data_overrides(workdir: Path, seq_len: int) -> dict[str, Any]:
    """Config overrides of every SFT-comparison stage: the generated chats, ``seq_len`` blocks."""
    return {"data.instructions": str(workdir / "sft_chats.jsonl"), "data.seq_len": seq_len}


def prepare_sft_base(workdir: Path, seq_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generated chats through prepare_data, then a short continued_pretraining on its
    shards: the model and data the SFT comparison starts from.

    Returns:
        The continued_pretraining result (its ``output_uri`` is the SFT stage's input) and
        prepare_data's ``sft_train`` manifest entry, with ``seq_len`` and ``chats_truncated``.
    """
    write_sft_chats(workdir / "sft_chats.jsonl", SFT_CHATS, SFT_DATA_SEED)
    data_config = bench_config(workdir, sft_data_overrides(workdir, seq_len))
    prepared = run_stage("prepare_data", data_config, SFT_DATA_RUN_KEY, None)
    steps = {"cpt.max_steps": WARMUP_STEPS, "cpt.log_every": WARMUP_STEPS, "cpt.warmup_steps": 0}
    base_config = bench_config(workdir, {**sft_data_overrides(workdir, seq_len), **steps})
    base = run_stage("continued_pretraining", base_config, SFT_BASE_RUN_KEY, prepared["output_uri"])
    manifest = storage.read_json(storage.join(prepared["outputs"]["data"], "manifest.json"))
    split = {**manifest["splits"]["sft_train"], "seq_len": manifest["seq_len"]}
    split["chats_truncated"] = manifest["counts"]["chats"]["truncated"]
    return base, split


def length_summary(examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Token counts of the SFT examples: whole chats and their trained targets."""
    tokens = np.array([len(e["input_ids"]) for e in examples])
    targets = np.array([sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples])
    pct = lambda a, q: int(np.percentile(a, q))  # noqa: E731
    return {
        "examples": len(examples),
        "tokens_median": pct(tokens, 50),
        "tokens_p90": pct(tokens, 90),
        "tokens_p99": pct(tokens, 99),
        "tokens_max": int(tokens.max()),
        "tokens_mean": round(float(tokens.mean()), 1),
        "targets_median": pct(targets, 50),
        "targets_p99": pct(targets, 99),
        "target_share_of_tokens": round(float(targets.sum() / tokens.sum()), 4),
    }


# --- SFT: the packed trainer against the Hugging Face Trainer --------------------------------


def sft_examples(data_uri: str, pad_id: int) -> list[dict[str, list[int]]]:
    """The SFT training examples, cut back out of the packed ``sft_train`` blocks.

    ``pack_examples`` never splits an example and restarts positions at each one, so every
    position-id segment is one example with its exact labels (prompt tokens -100); a block's
    trailing padding is the only segment with no trained label, and is dropped.
    """
    from pipeline.data.shards import read_manifest, read_split

    blocks = read_split(data_uri, read_manifest(data_uri), "sft_train")
    examples = []
    rows = slice(0, len(blocks))  # memory-mapped shards: read every row at once
    columns = (blocks.input_ids[rows], blocks.position_ids[rows], blocks.labels[rows])
    for ids, pos, labels in zip(*columns, strict=True):
        starts = [*np.flatnonzero(pos == 0).tolist(), len(ids)]
        for start, end in itertools.pairwise(starts):
            if (labels[start:end] == IGNORE_INDEX).all() and (ids[start:end] == pad_id).all():
                continue
            examples.append(
                {"input_ids": ids[start:end].tolist(), "labels": labels[start:end].tolist()}
            )
    return examples


def hf_trainer_worker(job: dict[str, Any]) -> None:
    """Ray Train worker: ``transformers.Trainer`` with the project's DeepSpeed config.

    Ray Train has started the gloo group and set RANK/WORLD_SIZE/LOCAL_RANK, which Accelerate
    (under the Trainer) picks up. Rank 0 writes ``hf_metrics.json`` into ``job["output_dir"]``.
    """
    from pipeline.config import config_from_dict

    config = config_from_dict(job["config"])
    if config.compute.pool == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist
    from transformers import Trainer

    from pipeline.train.model import load_causal_lm

    torch.set_num_threads(config.compute.cpus_per_worker)
    args = hf_training_args(config, job["output_dir"], dist.get_world_size())
    if not torch.cuda.is_available():
        # Accelerate finds no process-group backend for DeepSpeed without CUDA (its CPU path
        # turns DeepSpeed off), so it would count one process and feed every rank the same
        # batches. Tell it the group Ray Train started; on GPUs it finds it by itself.
        state = args.distributed_state
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ["LOCAL_RANK"])
    # After the TrainingArguments: under ZeRO-3 they hold the config that partitions the load.
    dtype = torch.bfloat16 if config.compute.precision == "bf16" else torch.float32
    # Plain sdpa: padded batches carry a padding mask, which transformers' sdpa takes as it is.
    model = load_causal_lm(job["model_dir"], "sdpa", dtype)
    per_batch: list[tuple[int, int, int]] = []  # (targets, tokens, tokens incl. padding)
    clock = step_clock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=job["examples"],
        data_collator=counting_collator(job["model_dir"], per_batch),
        callbacks=[clock],
    )
    out = trainer.train()
    metrics = hf_step_metrics(config, clock.begins, clock.ends, per_batch)
    if dist.get_rank() == 0:
        metrics["train_loss"] = out.training_loss
        Path(job["output_dir"], HF_METRICS_FILE).write_text(json.dumps(metrics))


def step_clock() -> Any:
    """A ``TrainerCallback`` that records the start and end of every optimizer step (forward,
    backward, clipping, optimizer step) in ``begins`` and ``ends``.

    The same window as the project loop's step time: batch loading and collation (and the
    target count) come before it in both.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    return StepClock()


def counting_collator(
    tokenizer_dir: str, per_batch: list[tuple[int, int, int]]
) -> Callable[[list[dict[str, list[int]]]], dict[str, Any]]:
    """Pads each batch to its longest example and appends (targets, tokens, tokens with
    padding) of every batch it builds to ``per_batch``."""
    from transformers import DataCollatorForSeq2Seq

    from pipeline.data.tokenizer import load_tokenizer

    pad = DataCollatorForSeq2Seq(
        load_tokenizer(tokenizer_dir), padding="longest", label_pad_token_id=IGNORE_INDEX
    )

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        real = sum(len(f["input_ids"]) for f in features)
        batch = pad(features)
        targets = int((batch["labels"] != IGNORE_INDEX).sum())
        per_batch.append((targets, real, batch["input_ids"].numel()))
        return dict(batch)

    return collate


def hf_step_metrics(
    config: PipelineConfig,
    begins: list[float],
    ends: list[float],
    per_batch: list[tuple[int, int, int]],
) -> dict[str, Any]:
    """Rates and padding over both workers' trained batches; every rank must call it (it
    all-reduces the counts). Rates are over the steps after the first, like the project's."""
    import torch
    import torch.distributed as dist

    sft = config.sft
    steps = sft.max_steps * sft.grad_accum_steps
    # Accelerate's loader fetches one batch ahead; the first ``steps`` batches are the trained ones.
    counts = torch.tensor(per_batch[:steps], dtype=torch.float64)
    dist.all_reduce(counts)
    counts = counts.reshape(sft.max_steps, sft.grad_accum_steps, 3).sum(dim=1)
    step_s = np.subtract(ends, begins)[1:]
    return {
        "steps": len(ends),
        "target_tokens_per_s": float(np.mean(counts[1:, 0].numpy() / step_s)),
        "tokens_per_s": float(np.mean(counts[1:, 2].numpy() / step_s)),
        "target_tokens_per_step": float(counts[:, 0].mean()),
        "tokens_per_step": float(counts[:, 2].mean()),
        "padding_share": float(1 - counts[:, 1].sum() / counts[:, 2].sum()),
        "examples_per_step": sft.micro_batch_size * sft.grad_accum_steps * dist.get_world_size(),
    }


def hf_training_args(config: PipelineConfig, output_dir: str, world: int) -> Any:
    """TrainingArguments carrying ``pipeline.train.zero.deepspeed_config`` as a dict.

    The Trainer checks that the DeepSpeed config's batch sizes, clipping, AdamW
    hyper-parameters and bf16 agree with these arguments, so every one is set to match.
    """
    from transformers import TrainingArguments

    from pipeline.train.zero import deepspeed_config

    sft, compute = config.sft, config.compute
    ds_config = deepspeed_config(compute, sft, world)
    # DeepSpeed derives it (micro x accumulation x world). Left in, the Trainer would check it
    # here against its own world size, which on CPU is set right only later (hf_trainer_worker).
    del ds_config["train_batch_size"]
    return TrainingArguments(
        output_dir=output_dir,
        deepspeed=ds_config,
        per_device_train_batch_size=sft.micro_batch_size,
        gradient_accumulation_steps=sft.grad_accum_steps,
        max_steps=sft.max_steps,
        learning_rate=sft.lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=sft.weight_decay,
        max_grad_norm=sft.grad_clip,
        warmup_steps=sft.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": sft.min_lr_ratio},
        bf16=compute.precision == "bf16",
        gradient_checkpointing=compute.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=sft.seed,
        logging_steps=sft.max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def hf_trainer_once(
    workdir: Path,
    config: PipelineConfig,
    base_outputs: dict[str, str],
    examples: list[dict[str, list[int]]],
    name: str,
) -> dict[str, Any]:
    """The baseline on ``compute.num_workers`` Ray Train workers (gloo), like the project's."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.ray_train import worker_resources

    output_dir = workdir / name
    output_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "config": config.model_dump(mode="json"),
        "model_dir": str(storage.download_dir(base_outputs["cpt_model"], workdir / "hf-model")),
        "examples": examples,
        "output_dir": str(output_dir),
    }
    # The workers cannot import this module (benchmarks/ is not on their path): ship its code.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        hf_trainer_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(
            num_workers=config.compute.num_workers,
            use_gpu=False,
            resources_per_worker=worker_resources(config.compute),
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=name, storage_path=str(workdir / "_ray_train_hf")),
    )
    started = time.perf_counter()
    with PeakRss() as rss:
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"HF Trainer baseline failed: {result.error}") from result.error
    metrics: dict[str, Any] = json.loads((output_dir / HF_METRICS_FILE).read_text())
    return {
        **metrics,
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_workers_mb": round(rss.peak_workers_mb),
    }


def sft_config(workdir: Path, seq_len: int, steps: int, micro_batch_size: int) -> PipelineConfig:
    """The SFT comparison's config: the demo's, on the generated chats, ``steps`` steps."""
    overrides = {"sft.max_steps": steps, "sft.log_every": steps}
    overrides["sft.micro_batch_size"] = micro_batch_size
    return bench_config(workdir, {**sft_data_overrides(workdir, seq_len), **overrides})


def packed_sft_once(
    workdir: Path, base_uri: str, split: dict[str, Any], steps: int, run_key: str
) -> dict[str, Any]:
    """The project's SFT stage from the model at ``base_uri``; its row of the comparison.

    ``split`` is prepare_data's ``sft_train`` entry: its packing figures give the padding share
    and the expected examples and targets per step (the loop counts slots and targets only).
    """
    config = sft_config(workdir, split["seq_len"], steps, SFT_BLOCKS_PER_MICRO)
    started = time.perf_counter()
    with PeakRss() as rss:
        result = run_stage("instruction_finetuning", config, run_key, base_uri)
    metrics = result["metrics"]
    sft, seq_len = config.sft, config.data.seq_len
    blocks_per_step = sft.micro_batch_size * sft.grad_accum_steps * config.compute.num_workers
    slots = split["blocks"] * seq_len
    return {
        "tokens_per_s": metrics["tokens_per_s"],
        "target_tokens_per_s": metrics["target_tokens_per_s"],
        "tokens_per_step": blocks_per_step * seq_len,
        # Expected over the split; a sampled step holds this many on average.
        "target_tokens_per_step": blocks_per_step * seq_len * split["trained_tokens"] / slots,
        "padding_share": 1 - split["tokens"] / slots,
        "examples_per_step": blocks_per_step * split["records"] / split["blocks"],
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "attention": metrics["attention"],
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_workers_mb": round(rss.peak_workers_mb),
    }


def sft_comparison(
    workdir: Path, compute_key: str, steps: int, repeats: int, seq_len: int
) -> dict[str, Any]:
    """Packed SFT, then the HF Trainer on the same examples, config and steps.

    The HF micro batch is the packed one (blocks) times the mean examples per ``sft_train``
    block, rounded: both sides train about as many examples per optimizer step. The two
    alternate ``repeats`` times and the ratio compares each side's best run: on a shared
    machine, load that comes and goes would otherwise decide which side looks faster.
    """
    from pipeline.data.tokenizer import load_tokenizer

    base, split = prepare_sft_base(workdir, seq_len)
    outputs = base["outputs"]
    tok_dir = storage.download_dir(outputs["tokenizer"], workdir / "hf-tokenizer")
    examples = sft_examples(outputs["data"], load_tokenizer(tok_dir).pad_token_id)
    per_block = split["records"] / split["blocks"]
    hf_micro = max(1, round(SFT_BLOCKS_PER_MICRO * per_block))
    hf_config = sft_config(workdir, seq_len, steps, hf_micro)
    print(
        f"SFT data: {len(examples)} examples in {split['blocks']} blocks of {split['seq_len']}, "
        f"HF micro batch {hf_config.sft.micro_batch_size} examples",
        flush=True,
    )
    packed_runs: list[dict[str, Any]] = []
    hf_runs: list[dict[str, Any]] = []
    for attempt in range(repeats):
        packed = packed_sft_once(workdir, base["output_uri"], split, steps, f"bench-sft-{attempt}")
        print(f"packed SFT: {packed['target_tokens_per_s']:.0f} target tokens/s", flush=True)
        packed_runs.append(packed)
        hf = hf_trainer_once(workdir, hf_config, outputs, examples, f"bench-hf-trainer-{attempt}")
        print(f"HF Trainer: {hf['target_tokens_per_s']:.0f} target tokens/s", flush=True)
        hf_runs.append(hf)
    return {
        "compute_setting": compute_key,
        "steps": steps,
        "repeats": repeats,
        "workers": hf_config.compute.num_workers,
        "data": {
            "chats_generated": SFT_CHATS,
            "seed": SFT_DATA_SEED,
            "answer_median_words": SFT_ANSWER_MEDIAN_WORDS,
            "answer_sigma": SFT_ANSWER_SIGMA,
            "seq_len": split["seq_len"],
            "sft_train_blocks": split["blocks"],
            "packing_efficiency": split["packing_efficiency"],
            "chats_truncated": split["chats_truncated"],
            **length_summary(examples),
        },
        "packed_micro_blocks": SFT_BLOCKS_PER_MICRO,
        "hf_micro_examples": hf_config.sft.micro_batch_size,
        "examples_per_block": round(per_block, 3),
        "packed": packed_runs,
        "hf_trainer": hf_runs,
        **ratio_figures(packed_runs, hf_runs),
    }


def ratio_figures(
    packed_runs: list[dict[str, Any]], hf_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Packed / HF Trainer target tokens/s of the best run of each, against the floor, and
    taken apart: ratio = (target share of packed slots / of HF slots) x (packed slots/s / HF
    slots/s), the padding saved times what a position costs on each side."""
    best_packed = max(packed_runs, key=lambda r: r["target_tokens_per_s"])
    best_hf = max(hf_runs, key=lambda r: r["target_tokens_per_s"])
    ratio = best_packed["target_tokens_per_s"] / best_hf["target_tokens_per_s"]
    mean = lambda runs: float(np.mean([r["target_tokens_per_s"] for r in runs]))  # noqa: E731
    return {
        "target_tokens_per_s_ratio": round(ratio, 3),
        "ratio_of_means": round(mean(packed_runs) / mean(hf_runs), 3),
        "ratio_floor": SFT_RATIO_FLOOR,
        "ratio_meets_floor": ratio >= SFT_RATIO_FLOOR,
        "ratio_factors": {
            "target_share_of_slots_packed": share_of_slots(best_packed),
            "target_share_of_slots_hf": share_of_slots(best_hf),
            "slot_rate_ratio": round(best_packed["tokens_per_s"] / best_hf["tokens_per_s"], 3),
        },
    }


def share_of_slots(run: dict[str, Any]) -> float:
    """Targets per token slot (padding included) over the timed steps of one run."""
    return round(run["target_tokens_per_s"] / run["tokens_per_s"], 4)


def sft_table(sft: dict[str, Any]) -> str:
    """The SFT comparison as a Markdown table (one row per run), then the data, the padding on
    each side and the ratio, taken apart into its two factors."""
    lines = [
        "| SFT trainer (2 workers) | run | target tokens/s | slots/s (incl. padding) "
        "| examples/step | target tokens/step | padding share | peak RSS workers (MB) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sides = (
        ("project, packed", sft["packed"]),
        ("HF Trainer, padded per batch", sft["hf_trainer"]),
    )
    for name, runs in sides:
        for attempt, r in enumerate(runs, 1):
            lines.append(
                f"| {name} | {attempt} | {r['target_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} "
                f"| {r['examples_per_step']:.1f} | {r['target_tokens_per_step']:.0f} "
                f"| {r['padding_share']:.1%} | {r['peak_rss_workers_mb']} | {r['wall_s']:.1f} |"
            )
    d, f = sft["data"], sft["ratio_factors"]
    share_ratio = f["target_share_of_slots_packed"] / f["target_share_of_slots_hf"]
    verdict = "meets" if sft["ratio_meets_floor"] else "does NOT meet"
    lines += [
        f"\nSFT data: {d['chats_generated']} generated chats (seed {d['seed']}), "
        f"{d['examples']} in sft_train; tokens per example median {d['tokens_median']}, "
        f"p90 {d['tokens_p90']}, p99 {d['tokens_p99']}, max {d['tokens_max']} "
        f"({d['chats_truncated']} chats cut to {d['seq_len']}); trained targets median "
        f"{d['targets_median']}, p99 {d['targets_p99']}, {d['target_share_of_tokens']:.1%} "
        "of the examples' tokens.",
        f"Packed: {d['sft_train_blocks']} blocks of {d['seq_len']} at "
        f"{d['packing_efficiency']:.1%} packing efficiency ({sft['examples_per_block']:.2f} "
        f"examples a block), {sft['packed_micro_blocks']} block per worker per micro-batch. "
        f"HF Trainer: {sft['hf_micro_examples']} examples per worker per micro-batch (about as "
        "many examples per optimizer step).",
        f"Targets per slot, best runs: packed {f['target_share_of_slots_packed']:.3f}, HF "
        f"{f['target_share_of_slots_hf']:.3f} (x{share_ratio:.2f}); slots/s packed / HF "
        f"x{f['slot_rate_ratio']:.2f}; product {share_ratio * f['slot_rate_ratio']:.2f}.",
        f"packed / HF Trainer target tokens/s, best run of each = "
        f"{sft['target_tokens_per_s_ratio']:.2f} ({verdict} the {sft['ratio_floor']} floor; ratio of means "
        f"{sft['ratio_of_means']:.2f}; {sft['steps']} steps, compute settings of "
        f"{sft['compute_setting']})",
    ]
    return "\n".join(lines)
