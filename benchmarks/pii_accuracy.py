"""PII scrubbing accuracy: recall per type and benign sentences changed, on two sets.

The *tuned* set, ``tests/data/pii/values.jsonl`` (``{"type", "text", "value"}``: a sentence with
one fake value of that type) and ``tests/data/pii/benign.jsonl`` (``{"text"}``: look-alikes that
must come out unchanged), is what the detectors were tuned on, so its figures are an upper
bound. The *blind* set, ``blind3_values.jsonl`` and ``blind3_benign.jsonl``, was written after the
detectors' last change by someone who saw neither them nor the tuned set: its figures are the
estimate to quote.

Each sentence is scrubbed with the default ``PiiScrubber``. A value counts as removed when its
exact text is gone and its type's placeholder is in the output. Prints a table per set, every
miss and every changed benign sentence with the scrubbed output, and writes both results to
``benchmarks/results/pii_accuracy.json``. Exits 1 if either set is under the targets:
recall >= 0.97, benign changed <= 2%.

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
RESULTS = REPO / "benchmarks" / "results" / "pii_accuracy.json"
MIN_RECALL = 0.97
MAX_BENIGN_CHANGED = 0.02
SETS = {
    "tuned": ("values.jsonl", "benign.jsonl"),
    "blind": ("blind3_values.jsonl", "blind3_benign.jsonl"),
}


def load(name: str) -> list[dict[str, Any]]:
    """The records of ``tests/data/pii/<name>``."""
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(values: str = "values.jsonl", benign: str = "benign.jsonl") -> dict[str, Any]:
    """Scrub one set (the tuned one by default).

    Returns planted/removed per type, misses as ``(type, value, text, output)`` and changed
    benign texts as ``(text, output)``.
    """
    from pipeline.data.pii import PiiScrubber

    scrubber = PiiScrubber()
    planted: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    missed = []
    for rec in load(values):
        out = scrubber.scrub(rec["text"])
        planted[rec["type"]] += 1
        if rec["value"] not in out and scrubber.placeholders[rec["type"]] in out:
            removed[rec["type"]] += 1
        else:
            missed.append((rec["type"], rec["value"], rec["text"], out))
    looks = load(benign)
    changed = [(r["text"], out) for r in looks if (out := scrubber.scrub(r["text"])) != r["text"]]
    return {
        "planted": planted,
        "removed": removed,
        "missed": missed,
        "benign": len(looks),
        "changed": changed,
    }


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready figures of one ``evaluate`` result, with whether it meets the targets."""
    total, hit = sum(r["planted"].values()), sum(r["removed"].values())
    recall, rate = hit / total, len(r["changed"]) / r["benign"]
    return {
        "recall_by_type": {
            kind: {
                "planted": r["planted"][kind],
                "removed": r["removed"][kind],
                "recall": round(r["removed"][kind] / r["planted"][kind], 4),
            }
            for kind in sorted(r["planted"])
        },
        "planted": total,
        "removed": hit,
        "recall": round(recall, 4),
        "benign": r["benign"],
        "benign_changed": len(r["changed"]),
        "benign_changed_rate": round(rate, 4),
        "ok": recall >= MIN_RECALL and rate <= MAX_BENIGN_CHANGED,
        "missed": [
            {"type": kind, "value": value, "text": text, "output": out}
            for kind, value, text, out in r["missed"]
        ],
        "changed": [{"text": text, "output": out} for text, out in r["changed"]],
    }


def report(name: str, s: dict[str, Any]) -> None:
    """Print one set's tables, its misses and its changed benign sentences."""
    print(f"## {name}\n\n| type | planted | removed | recall |\n|---|---:|---:|---:|")
    for kind, row in s["recall_by_type"].items():
        flag = "" if row["recall"] >= MIN_RECALL else " (under target)"
        print(f"| {kind} | {row['planted']} | {row['removed']} | {row['recall']:.3f}{flag} |")
    print(f"| **all** | {s['planted']} | {s['removed']} | {s['recall']:.3f} |\n")
    print("| benign total | changed | rate |\n|---:|---:|---:|")
    print(f"| {s['benign']} | {s['benign_changed']} | {s['benign_changed_rate']:.3f} |")
    if s["missed"] or s["changed"]:
        print()
    for m in s["missed"]:
        print(f"missed {m['type']} {m['value']!r}: {m['text']!r} -> {m['output']!r}")
    for c in s["changed"]:
        print(f"changed: {c['text']!r} -> {c['output']!r}")
    print(
        f"\n{name}: recall {s['recall']:.3f} (target >= {MIN_RECALL}), benign changed "
        f"{s['benign_changed_rate']:.3f} (target <= {MAX_BENIGN_CHANGED}): "
        f"{'ok' if s['ok'] else 'UNDER TARGET'}\n"
    )


def main() -> int:
    """Print both sets' tables and write the JSON; returns the exit code (1 under target)."""
    results = {name: summarize(evaluate(*files)) for name, files in SETS.items()}
    for name, s in results.items():
        report(name, s)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    under = [name for name, s in results.items() if not s["ok"]]
    print(f"under target: {', '.join(under)}" if under else "both sets meet the targets")
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
