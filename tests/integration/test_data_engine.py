"""prepare_data on a real Ray cluster: one node, then two (``ray start --address``), then two with
a worker process killed mid-task. The outputs are the same bytes every time, both nodes ran
units (the state API's task records say where), the killed task was retried, and the driver's
memory does not grow with the number of records.

Each run is a separate driver process connected to the head, as a Ray job's driver is.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from pipeline.devstack.ray_cluster import (
    RayHead,
    _ray_env,
    ray_head,
    ray_worker_node,
    state_list,
    wait_for_nodes,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
WORDS = np.array(
    [
        "refund",
        "courier",
        "order",
        "late",
        "missing",
        "driver",
        "pizza",
        "rain",
        "city",
        "support",
        "ticket",
        "card",
        "kitchen",
        "address",
        "receipt",
        "tip",
        "wallet",
        "promo",
        "rider",
        "store",
        "basket",
        "invoice",
        "delay",
    ]
)
DRIVER = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from pipeline.config import load_config
from pipeline.data.engine import peak_memory_mb
from pipeline.stages.prepare_data import prepare
prepare(load_config(Path(sys.argv[1]), json.loads(sys.argv[2])), sys.argv[3])
print("DRIVER_PEAK_KB", int(peak_memory_mb() * 1024), flush=True)
"""


def _documents(count: int, seed: int, every: int = 20) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 90, count)
    docs = [" ".join(rng.choice(WORDS, n)) + f" #{seed}-{i}" for i, n in enumerate(lengths)]
    # One in ``every`` repeats an earlier document exactly, one in ``every`` nearly.
    for i in range(0, count, every):
        if i > 40:
            docs[i] = docs[i - 37]
            docs[i + 1] = docs[i - 29].replace(" ", "  ", 1) + " ok"
    return docs


def write_corpus(folder: Path, documents: int, seed: int = 0, every: int = 20) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = _documents(documents, seed, every)
    half = len(docs) // 2
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    chats = [
        {"messages": [
            {"role": "user", "content": f"Where is order {i}? It was due at {i % 12} pm."},
            {"role": "assistant", "content": f"Order {i} left the {WORDS[i % len(WORDS)]} "
                                             f"{i % 7} minutes ago; a courier has it."},
        ]}
        for i in range(400)
    ]  # fmt: skip
    (folder / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return {
        "data.domain_corpus": [str(folder / "a.jsonl"), str(folder / "b.jsonl")],
        "data.instructions": str(folder / "chats.jsonl"),
        "data.chunk_bytes": 65536,
        "data.seq_len": 128,
        # A task per shard (demo shards hold 256 blocks): the shards are written all over the
        # cluster too.
        "data.shard_task_tokens": 1,
        "storage.artifact_root": str(folder / "artifacts"),
    }


def run_driver(head: RayHead, overrides: dict[str, Any], out: Path) -> tuple[int, str]:
    """One prepare_data driver connected to ``head``; returns its peak RSS (KB) and its log."""
    env = _ray_env(head.token_path)
    env["RAY_ADDRESS"] = head.gcs_address
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO / "configs" / "demo.yaml"), json.dumps(overrides),
         str(out)],
        env=env, capture_output=True, text=True, timeout=400, cwd=REPO,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    [peak] = [int(line.split()[1]) for line in done.stdout.splitlines() if "DRIVER_PEAK_KB" in line]
    return peak, log


def digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in {"result.json", "_SUCCESS"}
    }


def unit_tasks(head: RayHead) -> list[dict[str, Any]]:
    """Every attempt of every unit task the cluster ran (the dashboard's state API)."""
    return [t for t in state_list(head, "tasks", 10000) if "_run_units" in t.get("name", "")]


def tasks_named(head: RayHead, name: str) -> list[dict[str, Any]]:
    """Every attempt of the plain Ray tasks named ``name`` (``engine.map_tasks``)."""
    return [t for t in state_list(head, "tasks", 10000) if t.get("name") == name]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayHead, Path]]:
    workdir = tmp_path_factory.mktemp("data-engine")
    with ray_head(workdir, num_cpus=1, resources={}) as head:
        wait_for_nodes(head, 1)
        yield head, workdir


def test_one_node_two_nodes_and_a_killed_worker_give_the_same_bytes(
    cluster: tuple[RayHead, Path],
) -> None:
    head, workdir = cluster
    overrides = write_corpus(workdir / "corpus", 3000)
    run_driver(head, overrides, workdir / "one-node")
    one_node = digests(workdir / "one-node")
    assert any(name.startswith("data/records/domain-") for name in one_node)
    assert "data/.scratch" not in " ".join(one_node)  # the scratch folder is removed
    [head_node] = {t["node_id"] for t in unit_tasks(head)}

    with ray_worker_node(head, workdir, num_cpus=1) as worker_node:
        before = {(t["task_id"], t["attempt_number"]) for t in unit_tasks(head)}
        shards_before = {t["task_id"] for t in tasks_named(head, "write_shards")}
        _, log = run_driver(head, overrides, workdir / "two-nodes")
        tasks = [t for t in unit_tasks(head) if (t["task_id"], t["attempt_number"]) not in before]
        assert {t["node_id"] for t in tasks} == {head_node, worker_node}
        shard_writers = [
            t for t in tasks_named(head, "write_shards") if t["task_id"] not in shards_before
        ]
        assert {t["node_id"] for t in shard_writers} == {head_node, worker_node}
        assert digests(workdir / "two-nodes") == one_node
        assert "ETA" in log and "MB/s" in log  # progress lines

        # Kill the first worker process of this cluster seen running a unit task, with SIGKILL.
        # Only this cluster's workers (its state API lists them): another test's Ray on the
        # machine may be running unit tasks too.
        killed: list[int] = []
        stop = threading.Event()

        def killer() -> None:
            ours: set[int] = set()
            listed = 0.0
            while not stop.is_set() and not killed:
                if time.monotonic() - listed > 0.5:
                    ours = {int(w["pid"]) for w in state_list(head, "workers")}
                    listed = time.monotonic()
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    title = " ".join(proc.info["cmdline"] or [])
                    if proc.info["pid"] in ours and "_run_units" in title:
                        os.kill(proc.info["pid"], 9)
                        killed.append(proc.info["pid"])
                        return
                time.sleep(0.02)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        before = {(t["task_id"], t["attempt_number"]) for t in unit_tasks(head)}
        run_driver(head, overrides, workdir / "killed")
        stop.set()
        thread.join()
        assert killed, "no unit task was seen running"
        # Workers report task events every second or so: the retry may be listed a bit later.
        deadline = time.monotonic() + 20
        while True:
            attempts = [
                t for t in unit_tasks(head) if (t["task_id"], t["attempt_number"]) not in before
            ]
            if any(t["attempt_number"] > 0 for t in attempts) or time.monotonic() > deadline:
                break
            time.sleep(1)
        summary = sorted((t["task_id"][-6:], t["attempt_number"], t.get("state")) for t in attempts)
        assert any(t["attempt_number"] > 0 for t in attempts), f"no retry: {summary}"
        assert digests(workdir / "killed") == one_node


def test_driver_memory_does_not_grow_with_the_records(cluster: tuple[RayHead, Path]) -> None:
    from pipeline.data.tokenizer import train_bpe_tokenizer

    head, workdir = cluster
    # A given tokenizer, as with a base model: training one reads a sample on the driver, and
    # the sample (not the records) would grow with the corpus.
    tokenizer = workdir / "tokenizer"
    train_bpe_tokenizer(_documents(2000, seed=1), vocab_size=1024).save_pretrained(str(tokenizer))
    peaks = {}
    for documents in (10_000, 100_000):
        # Few duplicates: the driver holds the duplicate pairs (their number follows the
        # duplicates, by design), and this measures what follows the records.
        overrides = write_corpus(workdir / f"memory-{documents}", documents, seed=1, every=500)
        overrides["data.chunk_bytes"] = 4 * 2**20
        overrides["model.tokenizer"] = str(tokenizer)
        out = workdir / f"memory-{documents}-out"
        peaks[documents], _ = run_driver(head, overrides, out)
        manifest = json.loads((out / "data" / "manifest.json").read_text())
        assert manifest["counts"]["read"] == documents + 400
    growth_mb = (peaks[100_000] - peaks[10_000]) / 1024
    print(f"driver peak RSS (KB) by documents: {peaks}, growth {growth_mb:.1f} MB")
    # The process-pool driver kept ~540 bytes of metadata per record: +46 MB for 90k more.
    assert growth_mb < 16, f"driver peak grew by {growth_mb:.1f} MB: {peaks}"
