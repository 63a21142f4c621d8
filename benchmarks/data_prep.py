"""Data-preparation throughput against the bare fast tokenizer, on one machine.

Generates ``--mb`` MB (default 100) of variable-length documents and chats (with e-mails,
phones, cards, near duplicates and some bad lines), trains a byte-level BPE on a sample, then
measures on the same text and cores:

- the bare fast tokenizer (``encode_batch_fast``, Rust threads on every core),
- the full prepare_data stage (read, validate, clean, scrub, sign, tokenize, dedup, split, pack,
  write shards) on a local Ray cluster of ``--workers`` CPUs, started before the timing as a
  production cluster would be running already,

alternately (``--repeat`` stage runs between ``--repeat`` + 1 tokenizer runs; the fastest run of
each counts), and prints MB/s, tokens/s, the stage/tokenizer ratio (target >= 0.5), seconds per
GB per core (and what 100 GB and 1 TB then take on one 16-core node and on four), the peak
memory of the driver and of one Ray worker, and packing efficiency of cpt_train and sft_train
(target >= 0.99).
Writes ``benchmarks/results/data_prep.json``; exits 1 when a target is missed.

    .venv/bin/python benchmarks/data_prep.py [--mb 100] [--workers N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_VOCABULARY = (
    "the a order courier refund late driver restaurant delivery customer support ticket app "
    "payment card city rain traffic minutes kitchen pickup item missing charged twice policy "
    "we you they it was is will be could should please thanks sorry because when after before "
    "menu price tip rating review account address building floor gate code window weekend"
)
WORDS = _VOCABULARY.split()


def _sentence(rng: np.random.Generator) -> str:
    words = rng.choice(WORDS, int(rng.integers(6, 22)))
    return " ".join(words).capitalize() + "."


def _paragraph(rng: np.random.Generator) -> str:
    text = " ".join(_sentence(rng) for _ in range(int(rng.integers(2, 8))))
    roll = rng.random()
    if roll < 0.05:
        text += f" Contact jane.{int(rng.integers(1_000_000))}@example.com or +1 555 {int(rng.integers(100, 999))} 4567."
    elif roll < 0.07:
        text += " Paid with 4111 1111 1111 1111 from 10.1.2.3."
    elif roll < 0.10:
        text += "\n\n    def total(items):\n        return sum(i.price for i in items)\n"
    return text


def generate(folder: Path, mb: int, seed: int = 0) -> tuple[list[Path], Path]:
    """Domain JSONL files and one chat JSONL file totalling about ``mb`` MB."""
    rng = np.random.default_rng(seed)
    target = mb * 1_000_000
    written = 0
    files = []
    part = 0
    previous: list[str] = []
    while written < target * 0.8:
        path = folder / f"domain-{part:03d}.jsonl"
        with open(path, "w") as handle:
            for _ in range(2000):
                if written >= target * 0.8:
                    break
                n = int(rng.lognormal(1.5, 0.9)) + 1  # 1 .. ~100 paragraphs
                text = "\n\n".join(_paragraph(rng) for _ in range(min(n, 200)))
                if previous and rng.random() < 0.02:
                    text = previous[int(rng.integers(len(previous)))] + " Updated."
                previous = [*previous, text][-50:]
                line = json.dumps({"text": text})
                if rng.random() < 0.001:
                    line = line[: len(line) // 2]  # a truncated line
                handle.write(line + "\n")
                written += len(line) + 1
        files.append(path)
        part += 1
    chats = folder / "chats.jsonl"
    with open(chats, "w") as handle:
        while written < target:
            turns = []
            if rng.random() < 0.3:
                turns.append({"role": "system", "content": "You are a concise support agent."})
            for _ in range(int(rng.integers(1, 4))):
                turns.append({"role": "user", "content": _paragraph(rng)})
                answer = "\n\n".join(_paragraph(rng) for _ in range(int(rng.integers(1, 6))))
                turns.append({"role": "assistant", "content": answer})
            line = json.dumps({"messages": turns})
            handle.write(line + "\n")
            written += len(line) + 1
    return files, chats


class PeakMemory:
    """Samples the resident memory of this process (the stage's driver) and of the Ray worker
    processes (``ray::`` titles), every 0.1 s."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.driver = 0
        self.worker = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while self.running:
            self.driver = max(self.driver, self.process.memory_info().rss)
            for proc in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    title = " ".join(proc.info["cmdline"] or [])
                    if title.startswith("ray::") and "IDLE" not in title:
                        self.worker = max(self.worker, proc.memory_info().rss)
            time.sleep(0.1)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def _lines(path: Path) -> list[str]:
    with open(path) as handle:
        return handle.readlines()


def bare_tokenizer(tok: Any, files: list[Path], chats: Path) -> dict[str, float]:
    """Fast-tokenizer throughput on the same text (documents and chat contents), all cores."""
    texts = [json.loads(line)["text"] for f in files for line in _lines(f) if line.endswith("}\n")]
    for line in _lines(chats):
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    nbytes = sum(len(t.encode()) for t in texts)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), 4096):
        batch = tok.backend_tokenizer.encode_batch_fast(
            texts[start : start + 4096], add_special_tokens=False
        )
        tokens += sum(len(e.ids) for e in batch)
    seconds = time.perf_counter() - started
    return {
        "mb_per_s": nbytes / seconds / 1e6,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2, help="stage runs (bare runs: one more)")
    args = parser.parse_args()

    import logging

    from pipeline.config import load_config
    from pipeline.data.tokenizer import train_bpe_tokenizer
    from pipeline.stages.prepare_data import prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A running cluster, as in production (the stage runs as a job on it): starting Ray is not
    # part of the stage's throughput.
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        root = Path(scratch)
        print(f"generating {args.mb} MB ...", flush=True)
        files, chats = generate(root, args.mb)
        input_mb = sum(f.stat().st_size for f in [*files, chats]) / 1e6
        sample = [json.loads(line)["text"] for line in _lines(files[0]) if line.endswith("}\n")]
        tok = train_bpe_tokenizer(sample[:1000], vocab_size=8192)
        tok.save_pretrained(str(root / "tokenizer"))
        config = load_config(
            REPO / "configs" / "demo.yaml",
            {
                "data.domain_corpus": [str(f) for f in files],
                "data.instructions": str(chats),
                "data.seq_len": args.seq_len,
                "data.shard_blocks": 4096,
                "data.num_workers": args.workers,
                "data.chunk_bytes": 16 * 2**20,
                "model.tokenizer": str(root / "tokenizer"),
            },
        )
        # The two measurements alternate, and the fastest run of each counts: on a machine
        # whose speed drifts (a shared VM) one lucky or unlucky run must not decide the ratio.
        bare_runs: list[dict[str, float]] = []
        stage_seconds: list[float] = []
        driver_peak = worker_peak = 0
        for repeat in range(args.repeat):
            print(f"bare tokenizer ({repeat + 1}/{args.repeat}) ...", flush=True)
            bare_runs.append(bare_tokenizer(tok, files, chats))
            print(f"prepare_data on {args.workers} Ray CPUs ({repeat + 1}/{args.repeat}) ...")
            with PeakMemory() as memory:
                started = time.perf_counter()
                manifest = prepare(config, str(root / f"out-{repeat}"))
                stage_seconds.append(time.perf_counter() - started)
            driver_peak = max(driver_peak, memory.driver)
            worker_peak = max(worker_peak, memory.worker)
        print("bare tokenizer (last) ...", flush=True)
        bare_runs.append(bare_tokenizer(tok, files, chats))
        bare = max(bare_runs, key=lambda run: run["mb_per_s"])
        seconds = min(stage_seconds)
    tokens = sum(c["tokens"] for c in manifest["counts"]["corpora"].values())
    stage = {"mb_per_s": input_mb / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}
    splits = manifest["splits"]
    result = {
        "input_mb": round(input_mb, 1),
        "cores": os.cpu_count(),
        "workers": args.workers,
        "seq_len": args.seq_len,
        "bare_tokenizer": {k: round(v, 2) for k, v in bare.items()},
        "bare_tokenizer_runs_mb_per_s": [round(run["mb_per_s"], 2) for run in bare_runs],
        "stage_runs_seconds": [round(t, 2) for t in stage_seconds],
        "stage": {k: round(v, 2) for k, v in stage.items()},
        "ratio_to_bare_tokenizer": round(stage["mb_per_s"] / bare["mb_per_s"], 3),
        "seconds_per_gb_per_core": round(seconds / (input_mb / 1000) * args.workers, 1),
        "driver_peak_mb": round(driver_peak / 2**20),
        "worker_peak_mb": round(worker_peak / 2**20),
        "cpt_packing_efficiency": splits["cpt_train"]["packing_efficiency"],
        "sft_packing_efficiency": splits["sft_train"]["packing_efficiency"],
        "counts": {
            k: manifest["counts"][k] for k in ("read", "quarantined", "pii", "documents", "chats")
        },
    }
    per_gb_core = result["seconds_per_gb_per_core"]
    rows = [
        ("input", f"{result['input_mb']} MB, {tokens:,} tokens"),
        ("bare fast tokenizer", f"{bare['mb_per_s']:.2f} MB/s, {bare['tokens_per_s']:,.0f} tokens/s ({os.cpu_count()} cores; best of {', '.join(f'{r:.2f}' for r in result['bare_tokenizer_runs_mb_per_s'])})"),
        ("prepare_data stage", f"{stage['mb_per_s']:.2f} MB/s, {stage['tokens_per_s']:,.0f} tokens/s ({args.workers} Ray CPUs, {seconds:.1f} s; best of {', '.join(f'{t:.1f}' for t in stage_seconds)} s)"),
        ("stage / bare tokenizer", f"{result['ratio_to_bare_tokenizer']:.3f} (target >= 0.5)"),
        ("seconds per GB per core", f"{per_gb_core:.0f} s: 100 GB {_hours(per_gb_core * 100 / 16)} on one 16-core node, {_hours(per_gb_core * 100 / 64)} on four; 1 TB {_hours(per_gb_core * 1000 / 16)} / {_hours(per_gb_core * 1000 / 64)}"),
        ("peak memory: driver / one worker", f"{result['driver_peak_mb']} MB / {result['worker_peak_mb']} MB"),
        ("packing efficiency cpt_train", f"{result['cpt_packing_efficiency']:.4f} (target >= 0.99)"),
        ("packing efficiency sft_train", f"{result['sft_packing_efficiency']:.4f} (target >= 0.99)"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = REPO / "benchmarks" / "results" / "data_prep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    missed = [
        name
        for name, ok in (
            ("stage / bare tokenizer", result["ratio_to_bare_tokenizer"] >= 0.5),
            ("packing efficiency cpt_train", result["cpt_packing_efficiency"] >= 0.99),
            ("packing efficiency sft_train", result["sft_packing_efficiency"] >= 0.99),
        )
        if not ok
    ]
    if missed:
        raise SystemExit(f"below target: {', '.join(missed)}")


if __name__ == "__main__":
    main()
