"""Stage 1: raw domain text and chat examples -> tokenizer, packed shards and a manifest.

Read it top to bottom: fetch (or train) the tokenizer; split every input into units; Ray Data
tasks on the cluster's CPU nodes read, validate, clean, scrub, tokenize and sign each unit into
spill files (``data/engine.py``); the driver checks the bad-record share; a shuffle finds exact
and near duplicates, whose edges alone come back to the driver; the held-out split is drawn by
cluster; the driver streams the held-out records into ``heldout.json`` and their shards, tasks
mark the training records that overlap the evaluation data, and the training shards are laid
out from lengths and written by tasks (``data/assemble.py``). A worker's memory is bounded by
``chunk_bytes``; the driver's by one unit plus 8 bytes per duplicate (nothing per kept record);
the corpus itself only ever sits in the scratch folder (``data/.scratch`` under the stage,
removed at the end).

Outputs (under ``<run>/prepare_data/``): ``tokenizer/`` and ``data/`` with ``manifest.json``,
shards (``{split}-NNNNN.{ids,flags}.npy``), ``heldout.json``, ``quarantine.jsonl`` and
``data_report.md``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from pipeline.data import chat, chunks, engine, ingest, report, select, sources
from pipeline.data.assemble import assemble
from pipeline.stages.entrypoint import StageContext, StageOutput, stage_main

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STAGE = "prepare_data"
SCRATCH = ".scratch"
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
    specs: dict[str, tuple[Any, str, chunks.Kind, int]] = {
        "domain": (d.domain_corpus, "data.domain_corpus", "documents", chunks.DOCUMENTS),
        "replay": (d.replay_corpus, "data.replay_corpus", "documents", chunks.DOCUMENTS),
        "instructions": (d.instructions, "data.instructions", "chats", chunks.CHATS),
        "eval": (d.eval_sets, "data.eval_sets", "eval", -1),
    }
    jobs: dict[str, list[chunks.ChunkJob]] = {}
    index = 0
    for corpus, (spec, field, kind, group) in specs.items():
        jobs[corpus] = []
        if not sources.as_list(spec):
            continue
        for unit in sources.plan_units(sources.expand_inputs(spec, field), d.chunk_bytes):
            jobs[corpus].append(chunks.ChunkJob(index, unit, kind, settings, group))
            index += 1
    return jobs


def prepare(
    cfg: PipelineConfig,
    output_uri: str,
    on_progress: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest (also written under ``data/``).

    Args:
        on_progress: called every few seconds with records, MB and tokens processed and the
            rate, while the units are processed (the stage logs them to MLflow).
    """
    d = cfg.data
    started = time.monotonic()
    data_uri = storage.join(output_uri, "data")
    # Every node reaches the scratch folder: it sits beside the outputs (S3 on a cluster).
    scratch = storage.join(data_uri, SCRATCH)
    storage.delete_tree(scratch)  # a killed earlier attempt's leftovers
    phases: dict[str, str] = {}
    clock = time.monotonic()

    def phase(name: str) -> None:
        # Seconds, and the driver's peak memory so far: it must not follow the corpus.
        nonlocal clock
        now = time.monotonic()
        peak_mb = engine.peak_memory_mb()
        phases[name] = f"{now - clock:.1f} s, driver peak {peak_mb:.0f} MB"
        clock = now

    try:
        engine.connect(d.num_workers or usable_cpus())
        with tempfile.TemporaryDirectory(prefix="prepare-data-") as local:
            # Settings need the tokenizer folder; the domain units are planned first to train one.
            domain_units = sources.plan_units(
                sources.expand_inputs(d.domain_corpus, "data.domain_corpus"), d.chunk_bytes
            )
            tok = build_tokenizer(cfg, domain_units, local)
            chat.check_chat_tokens(tok, d.chat_format)
            tok_dir = Path(local) / "tokenizer"
            tok.save_pretrained(str(tok_dir))
            storage.upload_dir(tok_dir, storage.join(scratch, "tokenizer"))
            if not storage.is_s3(scratch):
                Path(scratch).mkdir(parents=True, exist_ok=True)
            settings = chunks.ChunkSettings(
                storage.join(scratch, "tokenizer"), scratch, d.fields, d.chat_format, d.scrub_pii,
                dict(d.pii_patterns), d.min_chars, d.max_doc_chars, d.long_doc_action,
                d.max_record_bytes, tuple(d.pii_types), dict(d.pii_placeholders),
                tuple(d.phone_regions),
            )  # fmt: skip
            jobs = plan_jobs(cfg, settings)
            every = [job for corpus_jobs in jobs.values() for job in corpus_jobs]
            phase("tokenizer")
            rows = engine.process_units(every, dict(d.worker_resources), d.num_workers, on_progress)
            phase("units")
            results = {job.index: chunks.read_summary(scratch, job.index) for job in every}

            with storage.local_staging(data_uri) as out:
                first_bad = select.merge_quarantine(every, results, scratch, out / QUARANTINE_FILE)
                quarantine_uri = storage.join(data_uri, QUARANTINE_FILE)
                if storage.is_s3(data_uri):
                    # Now, not with the rest: the gate below fails exactly when someone must read it.
                    storage.upload_file(out / QUARANTINE_FILE, quarantine_uri)
                read = sum(r.counts["read"] for r in results.values())
                bad: Counter[str] = sum((r.bad for r in results.values()), Counter())
                select.check_bad_fraction(read, bad, first_bad, d.max_bad_fraction, quarantine_uri)
                thresholds = {
                    chunks.DOCUMENTS: d.near_dup_threshold,
                    chunks.CHATS: d.chat_near_dup_threshold,
                }
                a, b, exact = engine.duplicate_edges(
                    rows, thresholds, d.num_workers or usable_cpus()
                )
                phase("dedup")
                group_of = {job.index: job.group for job in every}
                edge_group = np.array([group_of[int(i)] for i in a >> 32], dtype=np.int8)
                # Replay documents are held out too: their held-out part is the general corpus.
                groups = {
                    chunks.DOCUMENTS: [j.index for j in jobs["domain"] + jobs["replay"]],
                    chunks.CHATS: [j.index for j in jobs["instructions"]],
                }
                doc_sel, chat_sel = (
                    select.select(
                        units,
                        _group_edges(a, b, exact, edge_group == group),
                        d.heldout_fraction,
                        scratch,
                    )
                    for group, units in groups.items()
                )
                _check_split(doc_sel, "documents", d.heldout_fraction)
                _check_split(chat_sel, "chats", d.heldout_fraction)
                selections = {"domain": doc_sel, "replay": doc_sel, "instructions": chat_sel}
                units = {
                    job.index: (corpus, job.unit.uri)
                    for corpus, corpus_jobs in jobs.items()
                    if corpus in selections
                    for job in corpus_jobs
                }
                records_files = engine.write_records(
                    units, selections, scratch, data_uri, dict(d.worker_resources), d.num_workers
                )
                phase("selection")
                manifest = assemble(cfg, tok, jobs, doc_sel, chat_sel, scratch, out, data_uri)
                phase("shards")
                manifest["sources"] = {
                    corpus: [sources.fingerprint(u) for u in dict.fromkeys(j.unit.uri for j in js)]
                    for corpus, js in jobs.items()
                    if js
                }
                manifest["sources_digest"] = sources.sources_digest(
                    [p for prints in manifest["sources"].values() for p in prints]
                )
                manifest["counts"] = report.counts(jobs, results, doc_sel, chat_sel, bad, manifest)
                manifest["files"] = {
                    "heldout": HELDOUT_FILE,
                    "quarantine": QUARANTINE_FILE,
                    "report": DATA_REPORT_FILE,
                }
                manifest["records"] = records_files
                # Nothing that depends on the cluster or the clock: the same inputs, config and
                # seed give the same bytes on one node or four.
                storage.write_json(str(out / MANIFEST_FILE), manifest)
                (out / DATA_REPORT_FILE).write_text(report.markdown(manifest))
            storage.upload_dir(tok_dir, storage.join(output_uri, "tokenizer"))
    finally:
        # The spill is a copy of the corpus: not left behind on a failure either (a rerun starts
        # from the inputs).
        storage.delete_tree(scratch)
    log.info(
        "prepare_data: done in %.1f s (%s)",
        time.monotonic() - started,
        "; ".join(f"{name} {figures}" for name, figures in phases.items()),
    )
    return manifest


def _group_edges(
    a: np.ndarray, b: np.ndarray, exact: np.ndarray, chosen: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return a[chosen], b[chosen], exact[chosen]


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
    reports = 0

    def on_progress(metrics: dict[str, float]) -> None:
        nonlocal reports
        reports += 1
        try:
            tracking.log_metrics(cfg.tracking, ctx.mlflow_run_id, metrics, step=reports)
        except Exception as err:  # progress is advisory: an MLflow hiccup must not fail the stage
            log.warning("prepare_data: progress not logged to MLflow: %s", err)

    manifest = prepare(cfg, ctx.output_uri, on_progress)
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
