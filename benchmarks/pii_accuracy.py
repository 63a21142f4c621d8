"""PII scrubbing accuracy on the planted test set: recall per type and benign sentences changed.

Reads ``tests/data/pii/values.jsonl`` (``{"type", "text", "value"}``: a sentence with one fake
value of that type) and ``tests/data/pii/benign.jsonl`` (``{"text"}``: look-alikes that must come
out unchanged), scrubs each with the default ``PiiScrubber`` and prints a table. A value counts
as removed when its exact text is gone and its type's placeholder is in the output. Exits 1
under the targets: recall >= 0.97, benign changed <= 2%.

    .venv/bin/python benchmarks/pii_accuracy.py
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "pii"
MIN_RECALL = 0.97
MAX_BENIGN_CHANGED = 0.02


def load(name: str) -> list[dict[str, Any]]:
    """The records of ``tests/data/pii/<name>``."""
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate() -> dict[str, Any]:
    """Scrub the test set; returns planted/removed per type, misses and changed benign texts."""
    from pipeline.data.pii import PiiScrubber

    scrubber = PiiScrubber()
    planted: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    missed = []
    for rec in load("values.jsonl"):
        out = scrubber.scrub(rec["text"])
        planted[rec["type"]] += 1
        if rec["value"] not in out and scrubber.placeholders[rec["type"]] in out:
            removed[rec["type"]] += 1
        else:
            missed.append((rec["type"], rec["text"], out))
    benign = load("benign.jsonl")
    changed = [(r["text"], out) for r in benign if (out := scrubber.scrub(r["text"])) != r["text"]]
    return {
        "planted": planted,
        "removed": removed,
        "missed": missed,
        "benign": len(benign),
        "changed": changed,
    }


def main() -> int:
    """Print the table; returns the exit code (1 under target)."""
    r = evaluate()
    print("| type | planted | removed | recall |\n|---|---:|---:|---:|")
    for kind in sorted(r["planted"]):
        n, k = r["planted"][kind], r["removed"][kind]
        print(f"| {kind} | {n} | {k} | {k / n:.3f} |")
    total, hit = sum(r["planted"].values()), sum(r["removed"].values())
    recall, rate = hit / total, len(r["changed"]) / r["benign"]
    print(f"| **all** | {total} | {hit} | {recall:.3f} |\n")
    print("| benign total | changed | rate |\n|---:|---:|---:|")
    print(f"| {r['benign']} | {len(r['changed'])} | {rate:.3f} |\n")
    for kind, text, out in r["missed"]:
        print(f"missed {kind}: {text!r} -> {out!r}")
    for text, out in r["changed"]:
        print(f"changed: {text!r} -> {out!r}")
    ok = recall >= MIN_RECALL and rate <= MAX_BENIGN_CHANGED
    print(
        f"\nrecall {recall:.3f} (target >= {MIN_RECALL}), benign changed {rate:.3f} "
        f"(target <= {MAX_BENIGN_CHANGED}): {'ok' if ok else 'UNDER TARGET'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
