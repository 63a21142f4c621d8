"""The ``pipeline`` command: validate configs, prepare data, write the demo data, run the demo DAG.

Help and ``validate`` need no torch, ray or airflow; ``demo`` imports Airflow only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import REPO_ROOT, ConfigError, load_config

if TYPE_CHECKING:
    from pipeline.localstack import RayHead

DAG_ID = "domain_llm_retraining"
DAG_FILE = REPO_ROOT / "dags" / f"{DAG_ID}.py"


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.runs import check_inputs

    config = load_config(args.config, _parse_overrides(args.set))
    check_inputs(config)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    print(f"ok: {args.config} is valid (fingerprint {config.fingerprint()})", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory and throughput plan of a config (no torch, no GPU)."""
    from pipeline.planning.report import format_plan
    from pipeline.planning.search import make_plan

    config = load_config(args.config, _parse_overrides(args.set))
    plan = make_plan(config, args.section)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, limit=None if args.all else 12))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Run the prepare_data stage in this process (no Airflow, no Ray head); print its report."""
    import time

    from pipeline import storage
    from pipeline.runs import check_inputs
    from pipeline.stages import prepare_data
    from pipeline.stages.common import stage_main, write_resolved_config

    config = load_config(args.config, _parse_overrides(args.set))
    check_inputs(config)
    key = args.run_key or time.strftime("local-%Y%m%d-%H%M%S")
    config_uri = write_resolved_config(config, key)
    result = stage_main(
        prepare_data.STAGE, prepare_data.run, ["--config", config_uri, "--run-key", key]
    )
    data_uri = result["outputs"]["data"]
    print(storage.read_bytes(storage.join(data_uri, prepare_data.REPORT_FILE)).decode())
    print(f"data: {data_uri}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.demo_corpus import write_demo_data

    write_demo_data(Path(args.out))
    print(f"wrote {args.out}/domain.jsonl and {args.out}/instructions.jsonl")
    return 0


def airflow_env(workdir: Path) -> None:
    """Point Airflow at this repo's DAGs and plugins and a migrated SQLite DB under ``workdir``.

    Must run before ``airflow`` is first imported; values already set in the environment win.
    """
    import subprocess

    home = workdir / "airflow"
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PIPELINE_RAY_POLL_INTERVAL": "3",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"])
    if not (Path(os.environ["AIRFLOW_HOME"]) / "airflow.db").exists():
        airflow = Path(sys.executable).parent / "airflow"
        subprocess.run([str(airflow), "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def load_dag() -> Any:
    """Import the DAG file the way Airflow's parser does (a fresh module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("domain_llm_retraining_dag", DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def run_dag(conf: dict[str, Any], head: RayHead) -> Any:
    """Run the real DAG once with ``dag.test()`` (deferred tasks run their triggers in process).

    Returns:
        The finished DagRun.
    """
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = head.airflow_conn_uri()
    return load_dag().test(run_conf=conf)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the DAG on the demo config and print where to look."""
    import signal

    from pipeline.localstack import ray_head

    # The head runs in its own session; turn SIGTERM into an exit so the `with` stops it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    conf = {"config": str(Path(args.config).resolve()), **_parse_overrides(args.set)}
    workdir = REPO_ROOT / ".local"
    airflow_env(workdir)
    with ray_head(workdir / "ray") as head:
        dag_run = run_dag(conf, head)
    config = load_config(conf["config"], {k: v for k, v in conf.items() if k != "config"})
    print(f"\nDAG run {dag_run.run_id}: {dag_run.state}")
    print(f"artifacts: {config.storage.artifact_root}")
    print(
        f"MLflow:    {config.tracking.tracking_uri}  (make mlflow-ui, then {config.tracking.ui_url})"
    )
    return 0 if str(dag_run.state) in ("success", "DagRunState.SUCCESS") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Domain LLM pipeline: prepare data, continued pre-training, SFT, evaluate, promote.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser(
        "validate", help="validate a config (with overrides) and print it resolved"
    )
    validate.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    validate.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    validate.set_defaults(func=cmd_validate)

    prepare = sub.add_parser(
        "prepare-data",
        help="run the data preparation stage in this process and print its report",
    )
    prepare.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    prepare.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    prepare.add_argument(
        "--run-key", default=None, help="names the run folder (default: local-<timestamp>)"
    )
    prepare.set_defaults(func=cmd_prepare_data)

    plan = sub.add_parser(
        "plan",
        help="predict GPU memory, host RAM, step time and MFU of every DeepSpeed setting; "
        "show the fastest that fits",
    )
    plan.add_argument("config", help="YAML config file, e.g. configs/llama2-70b-h100.yaml")
    plan.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    plan.add_argument("--section", choices=("cpt", "sft"), default="cpt", help="training stage")
    plan.add_argument("--json", action="store_true", help="configured, candidates, chosen as JSON")
    plan.add_argument("--all", action="store_true", help="show every candidate, not the top 12")
    plan.set_defaults(func=cmd_plan)

    demo_data = sub.add_parser("demo-data", help="regenerate the demo corpus and instruction set")
    demo_data.add_argument("--out", default=str(REPO_ROOT / "configs" / "demo_data"))
    demo_data.set_defaults(func=cmd_demo_data)

    demo = sub.add_parser("demo", help="run the whole DAG once with dag.test() on a local Ray head")
    demo.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError and other input problems: the message says the fix
        if args.command != "prepare-data":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
