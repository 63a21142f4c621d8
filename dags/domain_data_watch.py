"""Watch the domain data location and emit the ``domain_data`` Asset when new files land.

Every ``PIPELINE_DATA_WATCH_MINUTES`` (default 15) minutes, while the retraining DAG is
scheduled on the Asset (``orchestration.schedule``: ``asset`` or ``weekly_or_asset``), one task
lists the location (a local folder or an ``s3://`` prefix), compares it with the listing it saw
last (kept under the artifact root) and emits the Asset only when files were added or
rewritten; otherwise the task is skipped and nothing is emitted. The first run records the
baseline: deploying the watch does not retrain on data that was already there.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from airflow.sdk import DAG, Asset, DeltaTriggerTimetable, get_current_context, task

from pipeline.config import default_config_path, load_config
from pipeline.data_watch import data_asset_uri

DEFAULT_CONFIG = default_config_path()
WATCH_MINUTES = float(os.environ.get("PIPELINE_DATA_WATCH_MINUTES", "15"))

config = load_config(DEFAULT_CONFIG)
domain_data = Asset(data_asset_uri(config))
watching = config.orchestration.schedule in ("asset", "weekly_or_asset")

with DAG(
    dag_id="domain_data_watch",
    description="Emit the domain_data Asset when new domain data lands",
    schedule=(
        DeltaTriggerTimetable(datetime.timedelta(minutes=WATCH_MINUTES)) if watching else None
    ),
    catchup=False,
    max_active_runs=1,
    # A listing that fails (S3 throttling, a network blip) is tried again before the next look.
    default_args={"retries": 2, "retry_delay": datetime.timedelta(minutes=1)},
    tags=["llm", "data"],
    doc_md=__doc__,
) as dag:

    @task(outlets=[domain_data])
    def detect_new_data() -> dict[str, Any]:
        """List the data location; emit the Asset (with what changed) only for new files."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.data_watch import check_for_new_data

        change, first = check_for_new_data(config.storage.artifact_root, domain_data.uri)
        if first:
            raise AirflowSkipException(
                f"first look at {domain_data.uri}: {change.files} files recorded as the baseline"
            )
        if not change.fresh:
            raise AirflowSkipException(f"no new or changed files under {domain_data.uri}")
        summary = change.summary()
        get_current_context()["outlet_events"][domain_data].extra = summary
        return summary

    @task
    def record_listing(summary: dict[str, Any]) -> None:
        """Runs only once detect_new_data succeeded, i.e. once its Asset event is committed:
        only then is the new listing the last one seen (a crash before re-announces it)."""
        from pipeline.data_watch import commit_listing

        commit_listing(config.storage.artifact_root, domain_data.uri, summary["listing_digest"])

    record_listing(detect_new_data())
