"""Triggering safely: the conf allowlist, the config folder, remote-safe storage, secrets kept
out of MLflow params and XCom, the failure notification, and fresh data starting a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.form import FORM_FIELDS, allowed_config_dirs, trigger_overrides
from pipeline.preflight import check_remote_safe, is_local_host, resolve_run
from tests.chat_webhook import ChatWebhook, chat_webhook

DEMO = REPO_ROOT / "configs" / "demo.yaml"
SECRET = "hf_hunter2secret"
PASSWORD = "pw-hunter2"


# --- dag_run.conf allowlist and the config folder --------------------------------------------


def test_conf_keys_outside_the_form_are_rejected_with_the_allowed_list() -> None:
    params = {"config": str(DEMO), **dict.fromkeys(FORM_FIELDS), "cpt.max_steps": 5}
    conf = {"config": str(DEMO), "cpt.max_steps": 5, "storage.artifact_root": "/tmp/elsewhere"}
    with pytest.raises(ConfigError) as err:
        trigger_overrides(params, conf, allowed_config_dirs(DEMO))
    message = str(err.value)
    assert message.startswith("dag_run.conf keys ['storage.artifact_root'] are not allowed")
    assert "config, data.domain_corpus, data.instructions, data.seq_len, cpt.max_steps" in message
    # Only the form's fields: the same conf without the extra key passes.
    del conf["storage.artifact_root"]
    path, overrides = trigger_overrides(params, conf, allowed_config_dirs(DEMO))
    assert path == str(DEMO)
    assert list(overrides) == list(FORM_FIELDS)
    assert overrides["cpt.max_steps"] == 5


def test_the_config_file_must_be_under_an_allowed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "mine.yaml"
    outside.write_text(DEMO.read_text())
    params = {"config": str(outside), **dict.fromkeys(FORM_FIELDS)}
    with pytest.raises(ConfigError, match=r"^config: .*mine\.yaml is outside the allowed config"):
        trigger_overrides(params, {"config": str(outside)}, allowed_config_dirs(DEMO))
    sneaky = {**params, "config": str(REPO_ROOT / "configs" / ".." / "pyproject.toml")}
    with pytest.raises(ConfigError, match="outside the allowed config folders"):
        trigger_overrides(sneaky, {}, allowed_config_dirs(DEMO))
    monkeypatch.setenv("PIPELINE_CONFIG_DIRS", f"/nonexistent{os.pathsep}{tmp_path}")
    path, _ = trigger_overrides(params, {"config": str(outside)}, allowed_config_dirs(DEMO))
    assert path == str(outside)


@pytest.mark.parametrize(
    ("field", "entry"),
    [
        ("data.domain_corpus", "/etc/passwd"),
        ("data.instructions", "../../../../etc/shadow"),
        ("data.domain_corpus", "demo_data/../../../pyproject.toml"),
        ("data.domain_corpus", "s3://other-bucket/customers.jsonl"),
        ("data.domain_corpus", "s3://datasets/demo/../../secrets/x.jsonl"),
        # Streamed datasets sources: a local folder outside, a Hub dataset nobody allowed.
        ("data.domain_corpus", "hf:/etc"),
        ("data.domain_corpus", "hf:someone/their-dataset"),
        ("data.instructions", "hf:demo_data/../../../.."),
    ],
)
def test_a_trigger_reads_data_only_from_the_configured_places(
    field: str, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"config": str(DEMO), **dict.fromkeys(FORM_FIELDS), field: entry}
    with pytest.raises(ConfigError) as err:
        trigger_overrides(params, {field: entry}, allowed_config_dirs(DEMO))
    demo_data = REPO_ROOT / "configs" / "demo_data"
    assert str(err.value).startswith(
        f"{field}: {entry} is outside the places a triggered run may read data from "
        f"({demo_data}); put the data there, or add its folder or s3:// prefix to "
        "PIPELINE_DATA_PREFIXES"
    )
    # The config's own data folder, and what PIPELINE_DATA_PREFIXES adds, are fine.
    inside = {**params, field: str(demo_data / "domain.jsonl")}
    assert trigger_overrides(inside, {}, allowed_config_dirs(DEMO))[1][field].endswith(
        "domain.jsonl"
    )
    monkeypatch.setenv("PIPELINE_DATA_PREFIXES", "s3://datasets/demo,hf:my-org/")
    fresh = {**params, field: ["s3://datasets/demo/2026-12/corpus.jsonl"]}
    assert trigger_overrides(fresh, {}, allowed_config_dirs(DEMO))[1][field] == (fresh[field])
    streamed = {**params, field: [f"hf:{demo_data}#train", "hf:my-org/tickets-2026#train"]}
    assert trigger_overrides(streamed, {}, allowed_config_dirs(DEMO))[1][field] == streamed[field]


# --- remote clusters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1:8265", True),
        ("http://localhost:8265", True),
        ("[::1]:8265", True),
        ("", True),
        ("ray-head.ray.svc:8265", False),
        ("https://ray.example.com/dashboard", False),
        ("10.0.3.7", False),
    ],
)
def test_ray_connection_host_decides_local(host: str, local: bool) -> None:
    assert is_local_host(host) is local


def test_a_remote_cluster_refuses_local_storage_and_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_run(str(DEMO), {}, "remote-run", remote_cluster=True)
    message = str(err.value)
    assert "the Ray cluster is remote" in message
    assert "set storage.artifact_root: s3://<bucket>/<prefix>" in message
    assert "set tracking.tracking_uri: http(s)://<your mlflow server>" in message
    assert "tracking.artifact_location is the local folder" in message
    assert "data.domain_corpus names local files" in message
    assert not (tmp_path / "remote-run").exists()
    shared = load_config(
        DEMO,
        {
            "storage.artifact_root": "s3://bucket/runs",
            "tracking.tracking_uri": "https://mlflow.example.com",
            "tracking.ui_url": "https://mlflow.example.com",
            "data.domain_corpus": "s3://bucket/data/domain/",
            "data.instructions": "s3://bucket/data/chats.jsonl",
        },
    )
    shared = shared.model_copy(
        update={"tracking": shared.tracking.model_copy(update={"artifact_location": None})}
    )
    check_remote_safe(shared, "remote.yaml")  # nothing local left: accepted


# --- secrets ---------------------------------------------------------------------------------


def test_redact_hides_credentials_and_secret_keys_but_not_look_alikes() -> None:
    from pipeline.redact import redact, redact_text

    line = "mlflow https://bob:pw@mlflow.example.com/x?token=abc&page=2 and s3://bucket/key"
    assert redact_text(line) == (
        "mlflow https://***@mlflow.example.com/x?token=***&page=2 and s3://bucket/key"
    )
    shown = redact(
        {
            "env_vars": {"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "k", "GH_TOKEN": "${GH}"},
            "model": {"tokenizer": "/models/tok", "max_new_tokens": 32},
            "uris": ["postgresql://u:p@db/mlflow"],
        }
    )
    assert shown == {
        "env_vars": {"HF_TOKEN": "***", "AWS_SECRET_ACCESS_KEY": "***", "GH_TOKEN": "${GH}"},
        "model": {"tokenizer": "/models/tok", "max_new_tokens": 32},
        "uris": ["postgresql://***@db/mlflow"],
    }


def test_references_in_place_of_credentials_are_kept_and_literals_found_anywhere() -> None:
    from pipeline.redact import literal_secrets, redact_text

    index = "--index-url https://${PIP_USER}:${PIP_TOKEN}@pypi.example.com/simple?key=${PIP_KEY}"
    assert redact_text(index) == index
    assert redact_text("https://${A}:pw@h/x") == "https://***@h/x"
    runtime_env = {
        "pip": ["torch", "--extra-index-url https://bob:pw@pypi.example.com/simple", index],
        "working_dir": "https://h.example.com/code.zip?X-Amz-Signature=abc",
        "env_vars": {"PIP_INDEX_URL": "https://bob:pw@h/simple", "HF_TOKEN": "${HF_TOKEN}"},
    }
    assert literal_secrets(runtime_env, "env") == [
        "env.pip[1]",
        "env.working_dir",
        "env.env_vars.PIP_INDEX_URL",
    ]


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (
            "curl -H 'Authorization: Bearer eyJhbGciOi.J9abc.def' https://x",
            "curl -H 'Authorization: Bearer ***' https://x",
        ),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("  Bearer ghp_abcdefghijklmnop1234", "  Bearer ***"),
        ("RAY_AUTH_TOKEN=0a1b2c3d4e5f ray job submit", "RAY_AUTH_TOKEN=*** ray job submit"),
        ("export AWS_SECRET_ACCESS_KEY=wJalrX/K7MDENG", "export AWS_SECRET_ACCESS_KEY=***"),
        ('export DB_PASS="hunter2 x"', 'export DB_PASS="***"'),
        ("connecting with password=hunter2 to db", "connecting with password=*** to db"),
        (
            'payload {"user": "bob", "password": "hunter2", "n": 3}',
            'payload {"user": "bob", "password": "***", "n": 3}',
        ),
        ("{'HF_TOKEN': 'hf_abc', 'tokenizer': '/m'}", "{'HF_TOKEN': '***', 'tokenizer': '/m'}"),
        ("HF_TOKEN: hf_abcdef max_new_tokens: 32", "HF_TOKEN: *** max_new_tokens: 32"),
        ("postgresql://user:p@ss@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://user:p/ss@w@host/x", "https://***@host/x"),
        (
            "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig=ab%2Fcd&se=2026",
            "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sig=***&se=2026",
        ),
        ("https://app/callback?code=abc123&state=xyz", "https://app/callback?code=***&state=xyz"),
        (
            "s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab&X-Amz-Security-Token=t",
            "s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        (
            "GITHUB_PAT=ghp_x signing_key=abc passes=3 pattern=a path=/x",
            "GITHUB_PAT=*** signing_key=*** passes=3 pattern=a path=/x",
        ),
        ("Cookie: session=abc; other=1", "Cookie: ***"),
        # References and look-alikes stay as they are.
        (
            "export HF_TOKEN=${HF_TOKEN}; Bearer ${TOKEN}",
            "export HF_TOKEN=${HF_TOKEN}; Bearer ${TOKEN}",
        ),
        ("http://localhost:4873/@types/node", "http://localhost:4873/@types/node"),
        ("if token == None: tokenizer=/m", "if token == None: tokenizer=/m"),
    ],
)
def test_redact_text_hides_the_forms_logs_carry_credentials_in(line: str, shown: str) -> None:
    from pipeline.redact import redact_text

    assert redact_text(line) == shown


def test_secret_key_names_are_whole_words_and_their_whole_value_is_hidden() -> None:
    from pipeline.redact import is_secret_key, literal_secrets, redact

    secret = ["DB_PASS", "PASSPHRASE", "GITHUB_PAT", "signing_key", "sessionKey", "Cookie"]
    visible = ["tokenizer", "max_new_tokens", "passes", "pattern", "path", "RAY_AUTH_MODE"]
    assert [is_secret_key(n) for n in secret + visible] == [True] * 6 + [False] * 6
    shown = redact(
        {
            "credentials": {"user": "bob", "region": "eu-west-1"},
            "secrets": ["s3cr3t", "${OK}"],
            "token": {"a": "${X}", "b": ""},
            "model": {"tokenizer": "/m", "max_new_tokens": 32},
        }
    )
    assert shown == {
        "credentials": "***",
        "secrets": "***",
        "token": {"a": "${X}", "b": ""},
        "model": {"tokenizer": "/m", "max_new_tokens": 32},
    }
    env = {"env_vars": {"credentials": {"user": "bob"}, "ok": {"token": "${T}"}, "DB_PASS": "x"}}
    assert literal_secrets(env, "e") == ["e.env_vars.credentials", "e.env_vars.DB_PASS"]


def _secret_config(tmp_path: Path, tracking_uri: str, token: str) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["domain_corpus"] = str(REPO_ROOT / "configs" / "demo_data" / "domain.jsonl")
    raw["data"]["instructions"] = str(REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl")
    raw["storage"] = {"artifact_root": str(tmp_path / "artifacts")}
    raw["tracking"] = {"tracking_uri": tracking_uri, "artifact_location": None, "ui_url": None}
    raw["orchestration"] = {"runtime_env": {"env_vars": {"HF_TOKEN": token, "LOG_LEVEL": "info"}}}
    path = tmp_path / f"secret-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_secrets_never_reach_xcom_or_mlflow_params(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    from pipeline import tracking

    authed = mlflow_server.replace("http://", f"http://bob:{PASSWORD}@")
    # A literal token in the config is refused, without repeating it.
    with pytest.raises(ConfigError) as err:
        resolve_run(str(_secret_config(tmp_path, authed, SECRET)), {}, "secret-run")
    assert "orchestration.runtime_env.env_vars.HF_TOKEN holds a literal secret" in str(err.value)
    assert "write HF_TOKEN: ${HF_TOKEN} instead" in str(err.value)
    assert SECRET not in str(err.value)
    # A reference passes through to the job (Ray expands it on the node); the URI password not.
    ref_config = _secret_config(tmp_path, authed, "${HF_TOKEN}")
    resolved = resolve_run(str(ref_config), {}, "secret-run")
    assert resolved["jobs"]["prepare_data"]["runtime_env"]["env_vars"]["HF_TOKEN"] == "${HF_TOKEN}"
    assert PASSWORD not in json.dumps(resolved)
    # Credentials in a runtime_env URI: refused naming the entry; as references, the job
    # options are the config's own runtime_env (a redacted one would break the job's pip).
    literal_pip = ["--index-url https://bob:hunter2@pypi.example.com/simple", "rouge-score"]
    raw = yaml.safe_load(ref_config.read_text())
    raw["orchestration"]["runtime_env"]["pip"] = literal_pip
    ref_config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        resolve_run(str(ref_config), {}, "secret-run")
    assert "orchestration.runtime_env.pip[0] holds a literal secret" in str(err.value)
    assert "https://${USER}:${TOKEN}@host" in str(err.value) and "hunter2" not in str(err.value)
    raw["orchestration"]["runtime_env"]["pip"][0] = (
        "--index-url https://${PIP_USER}:${PIP_TOKEN}@pypi.example.com/simple"
    )
    ref_config.write_text(yaml.safe_dump(raw))
    resolved = resolve_run(str(ref_config), {}, "secret-run")
    for options in resolved["jobs"].values():
        assert options["runtime_env"] == raw["orchestration"]["runtime_env"]
    # Stage params: even a literal token that got into a config is redacted.
    config = load_config(_secret_config(tmp_path, authed, SECRET))
    with tracking.stage_run(config, "secret-run", "prepare_data") as run_id:
        pass
    params = MlflowClient(tracking_uri=mlflow_server).get_run(run_id).data.params
    assert params["orchestration.runtime_env.env_vars.HF_TOKEN"] == "***"
    assert params["orchestration.runtime_env.env_vars.LOG_LEVEL"] == "info"
    assert params["tracking.tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    assert not [k for k, v in params.items() if SECRET in v or PASSWORD in v]


# --- the DAG: a rejected conf fails the first task and notifies -------------------------------


@pytest.fixture
def webhook() -> Iterator[ChatWebhook]:
    with chat_webhook() as hook:
        yield hook


@pytest.mark.parametrize("status", [404, 500])
def test_a_failing_webhook_is_named_by_connection_and_host_never_its_secret_path(
    webhook: ChatWebhook, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray_jobs.notifiers import WebhookError, send

    webhook.status = status
    # The secret is the path segment the connection's password adds, as Slack's last segment.
    monkeypatch.setenv(
        "AIRFLOW_CONN_PIPELINE_NOTIFY",
        json.dumps({"conn_type": "https", "host": webhook.url, "password": "XsecretX"}),
    )
    with pytest.raises(WebhookError) as err:
        send("pipeline_notify", "run failed", subject="run failed")
    assert str(err.value) == (
        f"connection 'pipeline_notify' (webhook host 127.0.0.1) answered HTTP {status}"
    )
    # Nothing chained or formatted with the error holds the URL.
    assert "XsecretX" not in "".join(traceback.format_exception(err.value))
    assert [m["path"] for m in webhook.received] == ["/services/T0/B0/XsecretX"]


def test_conf_outside_the_allowlist_fails_the_run_and_notifies(
    airflow_db: Path, webhook: ChatWebhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("PIPELINE_NOTIFY_CONN", "pipeline_notify")
    monkeypatch.setenv("AIRFLOW_CONN_PIPELINE_NOTIFY", webhook.url)
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", "http://127.0.0.1:1")
    bag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "domain_llm_retraining.py"))
    dag = bag.get_dag("domain_llm_retraining")
    dag_run = dag.test(run_conf={"config": str(DEMO), "tracking.tracking_uri": "sqlite:///x.db"})
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state).endswith("failed")
    assert states["resolve_config"].endswith("failed")
    assert states["prepare_data"].endswith("upstream_failed")
    (message,) = webhook.received
    assert message["path"] == "/services/T0/B0"
    assert message["text"].startswith(
        f"domain_llm_retraining run {dag_run.run_id} failed at stage resolve_config"
    )


def test_the_run_notification_says_what_the_run_decided(
    airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from the run's artifacts (a DAG callback cannot read XCom under dag.test())."""
    from types import SimpleNamespace

    from airflow.dag_processing.dagbag import DagBag

    from pipeline import storage
    from pipeline.preflight import RUN_FILE, run_key
    from ray_jobs.notifiers import run_message

    config = _secret_config(tmp_path, "sqlite:///x.db", "${HF_TOKEN}")
    monkeypatch.setenv("PIPELINE_CONFIG_DIRS", str(tmp_path))
    dag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "domain_llm_retraining.py")).get_dag(
        "domain_llm_retraining"
    )
    run_dir = tmp_path / "artifacts" / run_key(dag.dag_id, "manual__1")
    context: Any = {
        "dag": dag,
        "run_id": "manual__1",
        "dag_run": SimpleNamespace(conf={"config": str(config)}),
    }
    assert run_message(context, True) == f"{dag.dag_id} run manual__1 succeeded."

    storage.write_json(str(run_dir / RUN_FILE), {"mlflow_run_url": "https://mlflow/#/r/1"})
    refused = "promotion refused: failed gates: domain_bpb, instructions_rouge_l"
    result = {"outputs": {"registered_model": "domain-llm", "model_version": "7"}}
    storage.commit(str(run_dir / "promote"), {**result, "skip_reason": refused})
    assert run_message(context, True) == (
        f"{dag.dag_id} run manual__1 did not promote domain-llm v7: {refused}.\n"
        "MLflow parent run: https://mlflow/#/r/1"
    )
    storage.commit(str(run_dir / "promote"), {**result, "skip_reason": None})
    assert run_message(context, True).startswith(
        f"{dag.dag_id} run manual__1 succeeded: domain-llm v7 promoted to champion.\n"
    )


# --- fresh data: the watch DAG emits the Asset, the retraining DAG gets a run ----------------

ASSET_FLOW = """
import json, sys
from pathlib import Path
from typing import Any
from airflow.dag_processing.dagbag import DagBag
from airflow.jobs.job import Job
from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
from airflow.models.asset import AssetEvent, AssetModel
from airflow.models.dag import DagModel
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session

data = Path(sys.argv[1])
bag = DagBag(dag_folder=sys.argv[2])
watch = bag.get_dag("domain_data_watch")
asset_uri = watch.tasks[0].outlets[0].uri
def look():
    return {ti.task_id: str(ti.state) for ti in watch.test().get_task_instances()}
states = [look()]  # first look: the baseline
with create_session() as session:
    session.query(DagModel).filter(DagModel.dag_id == "domain_llm_retraining").update(
        {"is_paused": False}
    )
states.append(look())  # nothing new
(data / "fresh.jsonl").write_text('{"text": "new domain text"}\\n')
states.append(look())  # new file: emits, then records the listing
states.append(look())  # recorded: nothing new
runner = SchedulerJobRunner(job=Job(), num_runs=1)
with create_session() as session:
    query, triggered = DagModel.dags_needing_dagruns(session)
    due = [d for d in query.all() if d.dag_id in triggered]
    runner._create_dag_runs_asset_triggered(dag_models=due, session=session)
with create_session() as session:
    events = session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
    extras = [e.extra for e in events.filter(AssetModel.uri == asset_uri)]
    runs = session.query(DagRun).filter(
        DagRun.dag_id == "domain_llm_retraining", DagRun.run_type == "asset_triggered"
    )
    print(json.dumps({"states": states, "asset_uri": asset_uri, "extras": extras,
                      "runs": [str(r.state) for r in runs]}))
    # Leave the shared test DB as found: no queued run, the DAG paused.
    runs.delete()
    session.query(DagModel).filter(DagModel.dag_id == "domain_llm_retraining").update(
        {"is_paused": True}
    )
"""


def test_new_data_file_emits_the_asset_and_queues_a_retraining_run(
    airflow_db: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "old.jsonl").write_text('{"text": "old"}\n')
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["domain_corpus"] = str(data / "old.jsonl")
    raw["data"]["instructions"] = str(REPO_ROOT / "configs" / "demo_data" / "instructions.jsonl")
    raw["storage"] = {"artifact_root": str(tmp_path / "artifacts")}
    raw["orchestration"] = {"schedule": "asset"}
    config = tmp_path / "watch.yaml"
    config.write_text(yaml.safe_dump(raw))
    # A fresh interpreter: both DAG files read PIPELINE_CONFIG when parsed.
    out = subprocess.run(
        [sys.executable, "-c", ASSET_FLOW, str(data), str(REPO_ROOT / "dags")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PIPELINE_CONFIG": str(config),
            # Store this parse of the DAGs even if another test stored one seconds ago.
            "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "0",
        },
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["asset_uri"] == data.as_uri()
    looks = [
        {task: s.rsplit(".", 1)[-1].lower() for task, s in r.items()} for r in result["states"]
    ]
    assert [r["detect_new_data"] for r in looks] == ["skipped", "skipped", "success", "skipped"]
    assert [r["record_listing"] for r in looks] == ["skipped", "skipped", "success", "skipped"]
    (extra,) = result["extras"]
    assert extra["added"] == [str(data / "fresh.jsonl")]
    assert (extra["files"], extra["changed_count"]) == (2, 0)
    assert [s.rsplit(".", 1)[-1].lower() for s in result["runs"]] == ["queued"]
