"""What prepare_data did, counted: the manifest's ``counts``, a readable report, stage metrics
and the MLflow dataset input."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.contract import DATA_REPORT_FILE
from pipeline.data import chunks
from pipeline.data.select import Selection


def _sum(results: list[chunks.ChunkResult], attr: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for result in results:
        total.update(getattr(result, attr))
    return total


def counts(
    jobs: dict[str, list[chunks.ChunkJob]],
    results: dict[int, chunks.ChunkResult],
    doc_sel: Selection,
    chat_sel: Selection,
    bad: Counter[str],
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """Every count of the run, per corpus and in total."""
    per_corpus: dict[str, dict[str, Any]] = {}
    for corpus, corpus_jobs in jobs.items():
        if not corpus_jobs:
            continue
        rs = [results[j.index] for j in corpus_jobs]
        c = _sum(rs, "counts")
        per_corpus[corpus] = {
            "read": c["read"],
            "bytes": sum(r.bytes for r in rs),
            "quarantined": dict(_sum(rs, "bad")),
            "too_short": c["too_short"],
            "long_split": c["long_split"],
            "long_pieces": c["long_pieces"],
            "long_dropped": c["long_dropped"],
            "pii": dict(_sum(rs, "pii")),
            "tokens": c["tokens"],
        }
    assembly = manifest["assembly"]
    splits = manifest["splits"]
    return {
        "read": sum(c["read"] for c in per_corpus.values()),
        "quarantined": dict(bad),
        "quarantined_total": sum(bad.values()),
        "pii": dict(sum((Counter(c["pii"]) for c in per_corpus.values()), Counter())),
        "documents": {
            "exact_duplicates": doc_sel.counts["exact_duplicates"],
            "near_duplicates": doc_sel.counts["near_duplicates"],
            "decontaminated": assembly.get("documents_decontaminated", 0)
            + assembly.get("replay_decontaminated", 0),
            "train": splits["cpt_train"]["records"],
            "heldout": splits["cpt_heldout"]["records"],
            "replay_documents": assembly.get("replay_documents", 0),
            "replay_token_share": round(
                assembly.get("replay_tokens", 0)
                / max(1, assembly.get("replay_tokens", 0) + assembly.get("domain_tokens", 0)),
                4,
            ),
        },
        "chats": {
            "exact_duplicates": chat_sel.counts["exact_duplicates"],
            "near_duplicates": chat_sel.counts["near_duplicates"],
            "decontaminated": assembly.get("chats_decontaminated", 0),
            "truncated": assembly.get("chats_truncated", 0),
            "train": splits["sft_train"]["records"],
            "heldout": splits["sft_heldout"]["records"],
        },
        "corpora": per_corpus,
    }


def metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers for the stage result and MLflow (names kept from earlier versions)."""
    c = manifest["counts"]
    out: dict[str, Any] = {}
    for name, entry in manifest["splits"].items():
        out[f"{name}_blocks"] = entry["blocks"]
        out[f"{name}_trained_tokens"] = entry["trained_tokens"]
        out[f"{name}_tokens"] = entry["tokens"]
        out[f"{name}_packing_efficiency"] = entry["packing_efficiency"]
    docs, chats = c["documents"], c["chats"]
    out |= {
        "records_read": c["read"],
        "records_quarantined": c["quarantined_total"],
        "documents_kept": docs["train"] + docs["heldout"],
        "documents_exact_duplicates": docs["exact_duplicates"],
        "documents_near_duplicates": docs["near_duplicates"],
        "documents_duplicates": docs["exact_duplicates"] + docs["near_duplicates"],
        "documents_decontaminated": docs["decontaminated"],
        "chats_kept": chats["train"] + chats["heldout"],
        "chats_duplicates": chats["exact_duplicates"] + chats["near_duplicates"],
        "chats_decontaminated": chats["decontaminated"],
        "chats_truncated": chats["truncated"],
        "pii_replacements": sum(c["pii"].values()),
        "vocab_size": manifest["vocab_size"],
    }
    out |= {f"pii_{kind}": n for kind, n in c["pii"].items()}
    out |= {f"quarantined_{reason}": n for reason, n in c["quarantined"].items()}
    return out


def summary(manifest: dict[str, Any]) -> list[str]:
    """The lines the prepare_data task log ends with."""
    c = manifest["counts"]
    docs, chats = c["documents"], c["chats"]
    lines = [
        f"read {c['read']} records, quarantined {c['quarantined_total']}, "
        f"PII replaced {sum(c['pii'].values())}",
        f"documents: {docs['train']} train, {docs['heldout']} held out, "
        f"{docs['exact_duplicates'] + docs['near_duplicates']} duplicates dropped",
        f"chats: {chats['train']} train, {chats['heldout']} held out, "
        f"{chats['exact_duplicates'] + chats['near_duplicates']} duplicates dropped",
    ]
    for name, entry in manifest["splits"].items():
        lines.append(
            f"{name}: {entry['blocks']} blocks, {entry['tokens']} tokens, "
            f"packing {entry['packing_efficiency']:.1%}"
        )
    return lines


def markdown(manifest: dict[str, Any]) -> str:
    """A readable report of the manifest's counts."""
    c = manifest["counts"]
    lines = [
        "# Data preparation report",
        "",
        f"Sources digest `{manifest.get('sources_digest', '-')}`.",
        "",
        "| corpus | read | MB | quarantined | too short | long split / dropped | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus, pc in c["corpora"].items():
        lines.append(
            f"| {corpus} | {pc['read']} | {pc['bytes'] / 1e6:.2f} | "
            f"{sum(pc['quarantined'].values())} | {pc['too_short']} | "
            f"{pc['long_split']} / {pc['long_dropped']} | {pc['tokens']} |"
        )
    lines += ["", f"Quarantined by reason: {_pairs(c['quarantined'])}"]
    lines += [f"PII replaced by type: {_pairs(c['pii'])}", ""]
    lines += ["| records | exact dups | near dups | decontaminated | train | held out |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for what in ("documents", "chats"):
        w = c[what]
        lines.append(
            f"| {what} | {w['exact_duplicates']} | {w['near_duplicates']} | "
            f"{w['decontaminated']} | {w['train']} | {w['heldout']} |"
        )
    lines += ["", "| split | records | blocks | tokens | trained tokens | packing efficiency |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for name, s in manifest["splits"].items():
        lines.append(
            f"| {name} | {s['records']} | {s['blocks']} | {s['tokens']} | "
            f"{s['trained_tokens']} | {s['packing_efficiency']:.4f} |"
        )
    docs = c["documents"]
    lines += [
        "",
        f"Replay: {docs['replay_documents']} documents, {docs['replay_token_share']:.1%} of CPT "
        f"training tokens. Chats truncated to seq_len: {c['chats']['truncated']}.",
    ]
    return "\n".join(lines) + "\n"


def _pairs(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


def log_to_mlflow(
    cfg: PipelineConfig, run_id: str, data_uri: str, manifest: dict[str, Any]
) -> None:
    """The prepared data as the run's dataset input (digest: the sources' fingerprints), and
    the readable report as an artifact."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from pipeline import tracking

    with warnings.catch_warnings():
        # A local path matches two equivalent local sources; MLflow warns and picks one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data_uri)
    dataset = MetaDataset(  # type: ignore[abstract]  # MetaDataset is concrete at run time
        source, name="prepared-data", digest=manifest["sources_digest"][:16]
    )
    tag = InputTag("mlflow.data.context", "training")
    client = tracking.client(cfg.tracking)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])])
    client.log_text(run_id, markdown(manifest), DATA_REPORT_FILE)
