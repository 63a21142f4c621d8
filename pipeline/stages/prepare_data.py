"""Stage 1: raw domain text and chat examples -> tokenizer, packed shards and a manifest.

Read it top to bottom: fetch (or train) the tokenizer; split every input into units; worker
processes read, validate, clean, scrub, tokenize and sign each unit into spill files; the driver
checks the bad-record share, drops exact and near duplicates, draws the held-out split by
cluster, then streams the kept records into shards, dropping training records that overlap the
evaluation data. Memory stays bounded by ``num_workers`` x ``chunk_bytes`` plus small
per-record metadata; the corpus itself only ever sits in scratch files.

Outputs (under ``<run>/prepare_data/``): ``tokenizer/`` and ``data/`` with ``manifest.json``,
shards (``{split}-NNNNN.{ids,flags}.npy``), ``heldout.json``, ``quarantine.jsonl`` and
``data_report.md``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.contract import (
    DATA,
    DATA_REPORT_FILE,
    HELDOUT_FILE,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    TOKENIZER,
)
from pipeline.cpus import usable_cpus
from pipeline.data import chat, chunks, ingest, report, select, sources
from pipeline.data.assemble import assemble
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STAGE = "prepare_data"
_TOKENIZER_SAMPLE_CHARS = 200_000_000
log = logging.getLogger(__name__)


def build_tokenizer(
    cfg: PipelineConfig, units: list[sources.WorkUnit], scratch: str
) -> PreTrainedTokenizerBase:
    """The configured or base model's tokenizer, or a BPE trained on a sample of the corpus.

    The sample is the text workers tokenize: cleaned and, with ``data.scrub_pii``, scrubbed, so
    no vocabulary entry learns a piece of an e-mail address or phone number.
    """
    from pipeline.data import tokenizer
    from pipeline.data.pii import PiiScrubber

    fields = cfg.data.fields
    d = cfg.data
    scrubber = (
        PiiScrubber(
            dict(d.pii_patterns),
            types=d.pii_types,
            placeholders=dict(d.pii_placeholders),
            phone_regions=d.phone_regions,
        )
        if d.scrub_pii
        else None
    )

    def sample() -> Any:
        taken = 0
        for unit in units:
            for record in sources.stream_unit(unit, cfg.data.max_record_bytes):
                if isinstance(record, sources.Record):
                    text = ingest.document_text(record.value, fields)
                    if isinstance(text, str) and scrubber is not None:
                        text = scrubber.scrub(text)
                    if isinstance(text, str) and text:
                        yield text
                        taken += len(text)
                        if taken >= _TOKENIZER_SAMPLE_CHARS:
                            return

    # Base tokenizer files only (or a BPE trained on the sample), chat tokens added, template on.
    return tokenizer.training_tokenizer(cfg, scratch, sample())


def plan_jobs(
    cfg: PipelineConfig, settings: chunks.ChunkSettings
) -> dict[str, list[chunks.ChunkJob]]:
    """Work units per corpus: domain, replay, instructions, eval."""
    d = cfg.data
    specs: dict[str, tuple[Any, str, chunks.Kind]] = {
        "domain": (d.domain_corpus, "data.domain_corpus", "documents"),
        "replay": (d.replay_corpus, "data.replay_corpus", "documents"),
        "instructions": (d.instructions, "data.instructions", "chats"),
        "eval": (d.eval_sets, "data.eval_sets", "eval"),
    }
    jobs: dict[str, list[chunks.ChunkJob]] = {}
    index = 0
    for corpus, (spec, field, kind) in specs.items():
        jobs[corpus] = []
        if not sources.as_list(spec):
            continue
        for unit in sources.plan_units(sources.expand_inputs(spec, field), d.chunk_bytes):
            jobs[corpus].append(chunks.ChunkJob(index, unit, kind, settings))
            index += 1
    return jobs


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` processes, started now so that they import the tokenizer stack (seconds)
    while the driver builds the tokenizer; None for one worker (units then run in-process)."""
    import multiprocessing

    if workers <= 1:
        yield None
        return
    # spawn: the driver may hold threads (MLflow, Ray) that a fork would copy mid-operation.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=chunks.warm_up) as pool:
        for _ in range(workers):
            pool.submit(int)  # each submission starts a process (3.11 starts them on demand)
        yield pool


def run_workers(
    jobs: list[chunks.ChunkJob], pool: ProcessPoolExecutor | None
) -> dict[int, chunks.ChunkResult]:
    """Process every unit on ``pool`` (in this process without one), logging progress."""
    from concurrent.futures import as_completed

    total = sum(max(0, j.unit.end - j.unit.start) for j in jobs)
    started, done_bytes, last_log = time.monotonic(), 0, 0.0
    results: dict[int, chunks.ChunkResult] = {}

    def progress(result: chunks.ChunkResult) -> None:
        nonlocal done_bytes, last_log
        results[result.index] = result
        done_bytes += result.bytes
        now = time.monotonic()
        if now - last_log > 5 or len(results) == len(jobs):
            last_log = now
            rate = done_bytes / max(now - started, 1e-9) / 1e6
            log.info(
                "prepare_data: %d/%d units, %.1f MB%s, %.1f MB/s",
                len(results), len(jobs), done_bytes / 1e6,
                f" of {total / 1e6:.1f}" if total else "", rate,
            )  # fmt: skip

    if pool is None or len(jobs) <= 1:
        for job in jobs:
            progress(chunks.process_chunk(job))
        return results
    # Largest units first: a big unit started last (the instruction file is often one) would
    # leave every other worker idle while it finishes. Results are keyed by unit, not by order.
    by_size = sorted(jobs, key=lambda j: chunks.unit_bytes(j.unit), reverse=True)
    for future in as_completed([pool.submit(chunks.process_chunk, job) for job in by_size]):
        progress(future.result())
    return results


def prepare(cfg: PipelineConfig, output_uri: str) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest (also written under ``data/``)."""

    d = cfg.data
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prepare-data-") as scratch:
        # Settings need the tokenizer folder; the domain units are planned first to train one.
        domain_units = sources.plan_units(
            sources.expand_inputs(d.domain_corpus, "data.domain_corpus"), d.chunk_bytes
        )
        # The pod's CPUs (affinity, cgroup quota), not the node's that os.cpu_count() reports.
        workers = d.num_workers or usable_cpus()
        with worker_pool(workers) as pool:
            tok = build_tokenizer(cfg, domain_units, scratch)
            chat.check_chat_tokens(tok, d.chat_format)
            tok_dir = Path(scratch) / "tokenizer"
            tok.save_pretrained(str(tok_dir))
            spill = Path(scratch) / "spill"
            spill.mkdir()
            settings = chunks.ChunkSettings(
                str(tok_dir), str(spill), d.fields, d.chat_format, d.scrub_pii,
                dict(d.pii_patterns), d.min_chars, d.max_doc_chars, d.long_doc_action,
                d.max_record_bytes, tuple(d.pii_types), dict(d.pii_placeholders),
                tuple(d.phone_regions),
            )  # fmt: skip
            jobs = plan_jobs(cfg, settings)
            every = [job for corpus_jobs in jobs.values() for job in corpus_jobs]
            results = run_workers(every, pool)

        data_uri = storage.join(output_uri, "data")
        with storage.local_staging(data_uri) as out:
            first_bad = select.merge_quarantine(every, results, str(spill), out / QUARANTINE_FILE)
            quarantine_uri = storage.join(data_uri, QUARANTINE_FILE)
            if storage.is_s3(data_uri):
                # Now, not with the rest: the gate below fails exactly when someone must read it.
                storage.upload_file(out / QUARANTINE_FILE, quarantine_uri)
            read = sum(r.counts["read"] for r in results.values())
            bad: Counter[str] = sum((r.bad for r in results.values()), Counter())
            select.check_bad_fraction(read, bad, first_bad, d.max_bad_fraction, quarantine_uri)
            docs = [results[j.index] for j in jobs["domain"] + jobs["replay"]]
            chats = [results[j.index] for j in jobs["instructions"]]
            # Replay documents are held out too: their held-out part is the general corpus.
            doc_sel = select.select(
                docs,
                {j.index for j in jobs["domain"] + jobs["replay"]},
                d.heldout_fraction,
                d.near_dup_threshold,
            )
            chat_sel = select.select(
                chats,
                {j.index for j in jobs["instructions"]},
                d.heldout_fraction,
                d.chat_near_dup_threshold,
            )
            _check_split(doc_sel, "documents", d.heldout_fraction)
            _check_split(chat_sel, "chats", d.heldout_fraction)
            manifest = assemble(cfg, tok, jobs, results, doc_sel, chat_sel, str(spill), out)
            manifest["sources"] = {
                corpus: [sources.fingerprint(u) for u in dict.fromkeys(j.unit.uri for j in js)]
                for corpus, js in jobs.items()
                if js
            }
            manifest["sources_digest"] = sources.sources_digest(
                [p for prints in manifest["sources"].values() for p in prints]
            )
            manifest["counts"] = report.counts(jobs, results, doc_sel, chat_sel, bad, manifest)
            manifest["workers"] = workers
            manifest["seconds"] = round(time.monotonic() - started, 2)
            manifest["files"] = {
                "heldout": HELDOUT_FILE,
                "quarantine": QUARANTINE_FILE,
                "report": DATA_REPORT_FILE,
            }
            storage.write_json(str(out / MANIFEST_FILE), manifest)
            (out / DATA_REPORT_FILE).write_text(report.markdown(manifest))
        storage.upload_dir(tok_dir, storage.join(output_uri, "tokenizer"))
    return manifest


def _check_split(selection: select.Selection, what: str, fraction: float) -> None:
    train, heldout = selection.counts["train"], selection.counts["heldout"]
    if not train or not heldout:
        raise ValueError(
            f"data.heldout_fraction={fraction} leaves {train} training and {heldout} held-out "
            f"{what}; provide more data or change the fraction"
        )


def run(ctx: StageContext) -> StageOutput:
    from pipeline import tracking

    cfg = ctx.config
    manifest = prepare(cfg, ctx.output_uri)
    data_uri = storage.join(ctx.output_uri, "data")
    tracking.log_json_artifact(cfg.tracking, ctx.mlflow_run_id, MANIFEST_FILE, manifest)
    report.log_to_mlflow(cfg, ctx.mlflow_run_id, data_uri, manifest)
    log.info("data report:\n%s", report.markdown(manifest))
    return StageOutput(
        outputs={TOKENIZER: storage.join(ctx.output_uri, "tokenizer"), DATA: data_uri},
        metrics=report.metrics(manifest),
        summary=report.summary(manifest),
    )


if __name__ == "__main__":
    stage_main(STAGE, run)
