"""``docker/helm/airflow-values.yaml`` against the official Airflow chart and the rest of the
deployment: the Ray cluster it submits to (``docker/kuberay/raycluster.yaml``), the image it
runs (``docker/Dockerfile.airflow``) and the config it points at (``configs/``).

Keys and types are checked against the chart's ``values.schema.json`` (chart 1.21.0), trimmed
into ``tests/data/airflow-chart/`` by ``trim_schema.py`` there (its docstring names the source
commit). Each check is a function returning its problems; the last test breaks the values one
way at a time and expects the matching check to say so.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jsonschema
import pytest
import yaml
from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowException

from pipeline.config import REPO_ROOT, ConfigError, load_config
from pipeline.preflight import check_no_literal_secrets, check_remote_safe
from ray_jobs.hooks import dashboard_base_url, public_dashboard_url

VALUES_FILE = REPO_ROOT / "docker" / "helm" / "airflow-values.yaml"
CHART_VERSION = "1.21.0"
SCHEMA_FILE = (
    Path(__file__).parents[1] / "data" / "airflow-chart" / f"values.schema-{CHART_VERSION}.json"
)
RAY_MANIFEST = REPO_ROOT / "docker" / "kuberay" / "raycluster.yaml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.airflow"
README = REPO_ROOT / "README.md"
PROJECT_IN_IMAGE = "/opt/project"
"""Where Dockerfile.airflow installs the repository (editable, with configs/ beside it)."""
DAGS_IN_IMAGE = "/opt/airflow/dags"
"""The chart's DAG folder (``airflowHome``/dags) when ``dags.mountPath`` is not set."""
CHART_EXECUTOR = "CeleryExecutor"
"""The chart's ``executor`` when the values leave it out."""
TASK_COMPONENT = {"LocalExecutor": "scheduler"}
"""The chart section whose pods run the tasks (and so submit and stop Ray jobs), by executor."""
S3_COMPONENTS = ("dagProcessor",)
"""Besides the tasks' component: the DAG-level callbacks read the run's outcome from S3."""
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
AWS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

Values = dict[str, Any]


@pytest.fixture(scope="module")
def values() -> Values:
    loaded: Values = yaml.safe_load(VALUES_FILE.read_text())
    return loaded


def ray_cluster() -> dict[str, Any]:
    [cluster] = [
        d for d in yaml.safe_load_all(RAY_MANIFEST.read_text()) if d["kind"] == "RayCluster"
    ]
    return cluster


def ray_head_container() -> dict[str, Any]:
    container: dict[str, Any] = ray_cluster()["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def ray_token_secret() -> tuple[str, str]:
    """(Secret name, key) the Ray head reads RAY_AUTH_TOKEN from."""
    [ref] = [
        e["valueFrom"]["secretKeyRef"]
        for e in ray_head_container()["env"]
        if e["name"] == "RAY_AUTH_TOKEN"
    ]
    return ref["name"], ref["key"]


def ray_images() -> set[str]:
    spec = ray_cluster()["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]
    return {c["image"] for t in templates for c in t["spec"]["containers"]}


def env_of(entries: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """A chart ``env`` list by variable name."""
    return {e["name"]: e for e in entries or []}


def global_env(values: Values) -> dict[str, str]:
    return {name: e["value"] for name, e in env_of(values.get("env")).items()}


# --- checks: each returns what is wrong, [] when nothing is ----------------------------------


def unknown_keys(value: Any, node: dict[str, Any], path: str, defs: dict[str, Any]) -> list[str]:
    """Keys of ``value`` that the schema ``node`` does not declare. The chart's top level allows
    any key, so a misspelt top-level value would pass validation and be ignored by helm."""
    if "$ref" in node:
        node = defs[node["$ref"].removeprefix("#/definitions/")]
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [
            e
            for i, v in enumerate(value)
            for e in unknown_keys(v, node["items"], f"{path}[{i}]", defs)
        ]
    if not isinstance(value, dict) or "properties" not in node:
        return []
    problems = []
    for key, child in value.items():
        if key in node["properties"]:
            problems += unknown_keys(child, node["properties"][key], f"{path}.{key}", defs)
        else:
            problems.append(
                f"{path}.{key}: not in the chart's schema (or not in the trimmed copy: re-run "
                "tests/data/airflow-chart/trim_schema.py)"
            )
    return problems


def schema_problems(values: Values) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(values), key=lambda e: list(map(str, e.path)))
    ]
    return errors + unknown_keys(values, schema, "values", schema["definitions"])


def image_problems(values: Values) -> list[str]:
    """The Airflow image comes from the Ray image's registry and commit (the same tag), on the
    Airflow version its Dockerfile installs."""
    problems = []
    image = values["images"]["airflow"]
    images = ray_images()
    if len(images) != 1:
        return [f"raycluster.yaml runs {sorted(images)}: build one Ray image per commit"]
    [ray_image] = images
    ray_repository, ray_tag = ray_image.rsplit(":", 1)
    registry = ray_repository.rsplit("/", 1)[0]
    if image["repository"] != f"{registry}/airflow":
        problems.append(
            f"images.airflow.repository is {image['repository']}, not {registry}/airflow"
        )
    if image["tag"] != ray_tag:
        problems.append(f"images.airflow.tag is {image['tag']}; the Ray image is {ray_image}")
    [base] = re.findall(r"^FROM apache/airflow:(\S+?)-python", DOCKERFILE.read_text(), re.MULTILINE)
    if values["airflowVersion"] != base:
        problems.append(f"airflowVersion is {values['airflowVersion']}; the image has {base}")
    return problems


def config_problems(values: Values) -> list[str]:
    """PIPELINE_CONFIG is a config of the image that a remote Ray cluster can run."""
    env = global_env(values)
    path = env.get("PIPELINE_CONFIG", "")
    configs = f"{PROJECT_IN_IMAGE}/configs/"
    if not path.startswith(configs) or not path.endswith(".yaml"):
        return [f"PIPELINE_CONFIG is {path!r}, not a .yaml file under {configs}"]
    local = REPO_ROOT / path.removeprefix(f"{PROJECT_IN_IMAGE}/")
    if not local.is_file():
        return [f"PIPELINE_CONFIG names {path}, but {local} does not exist"]
    try:
        config = load_config(local)
        check_remote_safe(config, str(local))
        check_no_literal_secrets(config, str(local))
    except ConfigError as err:
        return [str(err)]
    deployment = env.get("PIPELINE_DEPLOYMENT", "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", deployment):
        return [f"PIPELINE_DEPLOYMENT is {deployment!r}; expected a short name such as prod"]
    return []


def ray_connection(values: Values) -> Connection:
    uri = global_env(values)["AIRFLOW_CONN_RAY_DEFAULT"]
    return Connection.from_uri(uri, conn_id="ray_default")


def ray_connection_problems(values: Values) -> list[str]:
    """``ray_default`` is the KubeRay head service's dashboard port, without a secret in it."""
    cluster = ray_cluster()
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    [port] = [p["containerPort"] for p in ray_head_container()["ports"] if p["name"] == "dashboard"]
    expected = f"http://{name}-head-svc.{namespace}.svc:{port}"
    try:
        conn = ray_connection(values)
    except AirflowException as err:  # e.g. a second "://" (a raw URL in the query)
        return [f"Airflow cannot parse AIRFLOW_CONN_RAY_DEFAULT: {err}"]
    problems = []
    if dashboard_base_url(conn) != expected:
        problems.append(f"ray_default is {dashboard_base_url(conn)}, not {expected}")
    if conn.password or conn.login:
        problems.append("ray_default carries credentials; the token goes in auth_token_path")
    extra = conn.extra_dejson
    if not extra.get("auth_token_path"):
        problems.append("ray_default has no auth_token_path")
    public = str(extra.get("public_url") or "")
    if not public_dashboard_url(extra, expected).startswith("https://"):
        problems.append(f"ray_default public_url is {public!r}, not an https URL a browser opens")
    # The query is split on & and cut at #: a raw URL there loses its own query or fragment.
    query = urlsplit(global_env(values)["AIRFLOW_CONN_RAY_DEFAULT"]).query
    raw = dict(part.partition("=")[::2] for part in query.split("&") if part)
    if raw.get("public_url") != quote(public, safe=""):
        problems.append(f"ray_default public_url is not URL-encoded: {raw.get('public_url')}")
    return problems


def token_path_in(component: dict[str, Any], secret: str, key: str) -> str | None:
    """Where ``component`` mounts key ``key`` of Secret ``secret`` as a file, if it does."""
    for volume in component.get("extraVolumes") or []:
        source = volume.get("secret") or {}
        if source.get("secretName") != secret:
            continue
        items = source.get("items")
        paths = [i["path"] for i in items if i["key"] == key] if items else [key]
        for mount in component.get("extraVolumeMounts") or []:
            if mount["name"] == volume["name"] and paths and "subPath" not in mount:
                return f"{mount['mountPath'].rstrip('/')}/{paths[0]}"
    return None


def token_mount_problems(values: Values) -> list[str]:
    """The pods that call Ray (the tasks' component and the triggerer) hold the token file that
    ray_default names, from the Secret the Ray cluster reads its token from."""
    executor = values.get("executor", CHART_EXECUTOR)
    if executor not in TASK_COMPONENT:
        return [f"executor {executor}: say in TASK_COMPONENT which chart section runs its tasks"]
    secret, key = ray_token_secret()
    token_path = ray_connection(values).extra_dejson.get("auth_token_path")
    problems = []
    for section in (TASK_COMPONENT[executor], "triggerer"):
        found = token_path_in(values.get(section) or {}, secret, key)
        if found != token_path:
            problems.append(
                f"{section} mounts key {key} of Secret {secret} at {found}; ray_default reads "
                f"{token_path}"
            )
    return problems


def triggerer_problems(values: Values) -> list[str]:
    """Deferred training tasks live in triggers: one triggerer is a single point of failure."""
    triggerer = values.get("triggerer") or {}
    if triggerer.get("enabled") is False or int(triggerer.get("replicas", 1)) < 2:
        return [f"triggerer.replicas is {triggerer.get('replicas', 1)}; run at least 2"]
    return []


def s3_problems(values: Values) -> list[str]:
    """The pods that read and write the artifact store get one IAM role (IRSA) and no keys."""
    sections = (
        TASK_COMPONENT.get(values.get("executor", CHART_EXECUTOR), "scheduler"),
        *S3_COMPONENTS,
    )
    roles = {
        s: ((values.get(s) or {}).get("serviceAccount") or {}).get("annotations", {})
        for s in sections
    }
    arns = {s: a.get(ROLE_ANNOTATION, "") for s, a in roles.items()}
    problems = [
        f"{s}.serviceAccount.annotations has no {ROLE_ANNOTATION} (arn:aws:iam::<account>:role/<name>)"
        for s, arn in arns.items()
        if not re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn)
    ]
    if len(set(arns.values())) > 1:
        problems.append(f"the S3 roles differ: {arns}")
    names = {s: ((values.get(s) or {}).get("serviceAccount") or {}).get("name") for s in sections}
    problems += [f"{s}.serviceAccount.name is not set" for s, n in names.items() if not n]
    env_lists = [values.get("env")] + [
        (values.get(s) or {}).get("env") for s in values if isinstance(values.get(s), dict)
    ]
    keys = sorted({n for entries in env_lists for n in env_of(entries) if n in AWS_KEY_VARS})
    problems += [f"{n} is set: static keys take precedence over the IRSA role" for n in keys]
    return problems


def notify_problems(values: Values) -> list[str]:
    """The DAG processor, where DAG-level callbacks run, has the notification connection."""
    env = env_of((values.get("dagProcessor") or {}).get("env"))
    conn_id = (env.get("PIPELINE_NOTIFY_CONN") or {}).get("value")
    if not conn_id:
        return ["dagProcessor.env has no PIPELINE_NOTIFY_CONN"]
    var = f"AIRFLOW_CONN_{conn_id.upper()}"
    if "secretKeyRef" not in ((env.get(var) or {}).get("valueFrom") or {}):
        return [f"dagProcessor.env has no {var} from a Secret (PIPELINE_NOTIFY_CONN={conn_id})"]
    return []


def dags_problems(values: Values) -> list[str]:
    """The DAGs come from the image: no git-sync, no DAG volume over the image's folder."""
    dags = values.get("dags") or {}
    problems = [
        f"dags.{k}.enabled is not false: the DAGs are baked into the image"
        for k in ("gitSync", "persistence")
        if (dags.get(k) or {}).get("enabled", k == "persistence") is not False
    ]
    folder = dags.get("mountPath") or DAGS_IN_IMAGE
    copied = re.findall(r"^COPY (?:--\S+ )*dags/ (\S+?)/?$", DOCKERFILE.read_text(), re.MULTILINE)
    if copied != [folder]:
        problems.append(f"Dockerfile.airflow copies dags/ to {copied}; the chart reads {folder}")
    return problems


CHECKS: dict[str, Callable[[Values], list[str]]] = {
    "schema": schema_problems,
    "image": image_problems,
    "config": config_problems,
    "ray connection": ray_connection_problems,
    "token mount": token_mount_problems,
    "triggerer": triggerer_problems,
    "s3": s3_problems,
    "notify": notify_problems,
    "dags": dags_problems,
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_the_values_pass(values: Values, check: str) -> None:
    assert CHECKS[check](values) == []


def test_the_schema_is_the_chart_version_the_readme_installs() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert f"chart {CHART_VERSION}," in schema["$comment"]
    [command] = re.findall(
        r"helm upgrade --install airflow apache-airflow/airflow[^`]*", README.read_text()
    )
    assert f"--version {CHART_VERSION}" in command
    assert str(VALUES_FILE.relative_to(REPO_ROOT)) in command


# --- each check catches what it is for ---------------------------------------------------------


def set_env(entries: list[dict[str, Any]], name: str, value: str) -> None:
    [entry] = [e for e in entries if e["name"] == name]
    entry["value"] = value


def _conn(values: Values, uri: str) -> None:
    set_env(values["env"], "AIRFLOW_CONN_RAY_DEFAULT", uri)


HEAD = "http://llm-pipeline-head-svc.llm-pipeline.svc:8265"
QUERY = "auth_token_path=/var/run/secrets/ray/token&public_url=https%3A%2F%2Fray.example.com"
BREAKS: list[tuple[str, Callable[[Values], None], str, str]] = [
    # (what, how, which check, a piece of its message)
    ("a misspelt key", lambda v: v["triggerer"].update(replica=2), "schema", "triggerer.replica"),
    (
        "a misspelt top-level key",
        lambda v: v.update(executer="LocalExecutor"),
        "schema",
        "values.executer",
    ),
    (
        "a string count",
        lambda v: v["triggerer"].update(replicas="2"),
        "schema",
        "is not of type 'integer'",
    ),
    ("an executor name", lambda v: v.update(executor="local"), "schema", "does not match"),
    (
        "another tag",
        lambda v: v["images"]["airflow"].update(tag="latest"),
        "image",
        "the Ray image is",
    ),
    (
        "another registry",
        lambda v: v["images"]["airflow"].update(repository="apache/airflow"),
        "image",
        "not registry.example.com",
    ),
    ("another Airflow", lambda v: v.update(airflowVersion="3.2.0"), "image", "the image has 3.3.2"),
    (
        "a local config",
        lambda v: set_env(v["env"], "PIPELINE_CONFIG", "/opt/project/configs/demo.yaml"),
        "config",
        "the Ray cluster is remote",
    ),
    (
        "a missing config",
        lambda v: set_env(v["env"], "PIPELINE_CONFIG", "/opt/project/configs/prod.yaml"),
        "config",
        "does not exist",
    ),
    (
        "a config elsewhere",
        lambda v: set_env(v["env"], "PIPELINE_CONFIG", "/etc/pipeline.yaml"),
        "config",
        "not a .yaml file under",
    ),
    (
        "no deployment name",
        lambda v: set_env(v["env"], "PIPELINE_DEPLOYMENT", ""),
        "config",
        "PIPELINE_DEPLOYMENT",
    ),
    (
        "another namespace",
        lambda v: _conn(v, f"http://llm-pipeline-head-svc.default.svc:8265?{QUERY}"),
        "ray connection",
        "not http://llm-pipeline-head-svc.llm-pipeline.svc:8265",
    ),
    (
        "the GCS port",
        lambda v: _conn(v, f"http://llm-pipeline-head-svc.llm-pipeline.svc:6379?{QUERY}"),
        "ray connection",
        "not http://",
    ),
    (
        "the token in the URI",
        lambda v: _conn(v, f"http://:tok@llm-pipeline-head-svc.llm-pipeline.svc:8265?{QUERY}"),
        "ray connection",
        "carries credentials",
    ),
    (
        "a raw public_url",
        lambda v: _conn(
            v,
            f"{HEAD}?auth_token_path=/var/run/secrets/ray/token&public_url=https://ray.example.com",
        ),
        "ray connection",
        "Airflow cannot parse",
    ),
    (
        "a half-encoded public_url",
        lambda v: _conn(
            v,
            f"{HEAD}?auth_token_path=/var/run/secrets/ray/token"
            "&public_url=https%3A%2F%2Fray.example.com/ray#jobs",
        ),
        "ray connection",
        "not URL-encoded",
    ),
    (
        "no public_url",
        lambda v: _conn(v, f"{HEAD}?auth_token_path=/var/run/secrets/ray/token"),
        "ray connection",
        "not an https URL",
    ),
    (
        "another token path",
        lambda v: _conn(
            v,
            f"{HEAD}?auth_token_path=/var/run/secrets/token&public_url=https%3A%2F%2Fray.example.com",
        ),
        "token mount",
        "ray_default reads /var/run/secrets/token",
    ),
    (
        "another Secret",
        lambda v: v["scheduler"]["extraVolumes"][0]["secret"].update(secretName="ray-token"),
        "token mount",
        "scheduler mounts key token of Secret ray-auth-token at None",
    ),
    (
        "no token on the triggerer",
        lambda v: v["triggerer"].pop("extraVolumeMounts"),
        "token mount",
        "triggerer mounts",
    ),
    (
        "a Celery executor",
        lambda v: v.update(executor="CeleryExecutor"),
        "token mount",
        "TASK_COMPONENT",
    ),
    ("one triggerer", lambda v: v["triggerer"].update(replicas=1), "triggerer", "run at least 2"),
    (
        "no role on the DAG processor",
        lambda v: v["dagProcessor"]["serviceAccount"].pop("annotations"),
        "s3",
        "dagProcessor.serviceAccount.annotations",
    ),
    (
        "two roles",
        lambda v: v["scheduler"]["serviceAccount"]["annotations"].update(
            {ROLE_ANNOTATION: "arn:aws:iam::111122223333:role/other"}
        ),
        "s3",
        "the S3 roles differ",
    ),
    (
        "static keys",
        lambda v: v["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "s3",
        "AWS_SECRET_ACCESS_KEY is set",
    ),
    (
        "no notify secret",
        lambda v: v["dagProcessor"]["env"].pop(),
        "notify",
        "AIRFLOW_CONN_PIPELINE_NOTIFY",
    ),
    (
        "git-sync",
        lambda v: v["dags"]["gitSync"].update(enabled=True),
        "dags",
        "dags.gitSync.enabled",
    ),
    ("a DAG volume", lambda v: v["dags"].pop("persistence"), "dags", "dags.persistence.enabled"),
    (
        "another DAG folder",
        lambda v: v["dags"].update(mountPath="/opt/dags"),
        "dags",
        "the chart reads /opt/dags",
    ),
]


@pytest.mark.parametrize(("what", "broken", "check", "message"), BREAKS, ids=[b[0] for b in BREAKS])
def test_each_check_catches_a_broken_value(
    values: Values, what: str, broken: Callable[[Values], None], check: str, message: str
) -> None:
    changed = copy.deepcopy(values)
    broken(changed)
    problems = CHECKS[check](changed)
    assert any(message in p for p in problems), (what, problems)
