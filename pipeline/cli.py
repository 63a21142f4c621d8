"""The ``pipeline`` command: validate configs, prepare data, write the demo data, run the demo DAG.

Argument parsing and thin ``cmd_*`` functions over the library; the demo itself is
``pipeline.devstack.demo``. Help and ``validate`` need no torch, ray or airflow; ``demo`` imports
Airflow only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, ConfigError, load_config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set section.field=value`` items as config overrides (values parsed as YAML).

    Raises:
        ConfigError: an item without ``=``.
    """
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.preflight import check_inputs

    config = load_config(args.config, parse_overrides(args.set))
    check_inputs(config)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    print(f"ok: {args.config} is valid (fingerprint {config.fingerprint()})", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory and throughput plan of a config (no torch, no GPU)."""
    from pipeline.planning.adapters import METHODS, Adapter
    from pipeline.planning.report import format_methods, format_plan
    from pipeline.planning.search import make_plan

    config = load_config(args.config, parse_overrides(args.set))
    train = getattr(config, args.section)
    method = args.method or train.method
    methods = METHODS if args.compare_methods else (method,)
    rank = train.adapter.rank if args.rank is None else args.rank
    dropout = train.adapter.dropout if args.lora_dropout is None else args.lora_dropout
    try:
        adapters = {
            m: Adapter(
                method=m,
                rank=rank,
                targets=tuple(train.adapter.target_modules),
                dropout=dropout,
                double_quant=train.adapter.double_quant,
            )
            for m in methods
        }
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plans = {m: make_plan(config, args.section, adapter) for m, adapter in adapters.items()}
    if args.json:
        document = {m: plan.to_dict() for m, plan in plans.items()}
        print(json.dumps(document if args.compare_methods else document[method], indent=2))
    elif args.compare_methods:
        print(format_methods(plans))
    else:
        print(format_plan(plans[method], limit=None if args.all else 12))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Run the prepare_data stage in this process (no Airflow, no Ray head); print its report."""
    import time

    from pipeline import storage
    from pipeline.contract import DATA, DATA_REPORT_FILE
    from pipeline.identity import write_resolved_config
    from pipeline.preflight import check_inputs
    from pipeline.stages import prepare_data
    from pipeline.stages.entrypoint import stage_main

    config = load_config(args.config, parse_overrides(args.set))
    check_inputs(config)
    key = args.run_key or time.strftime("local-%Y%m%d-%H%M%S")
    config_uri = write_resolved_config(config, key)
    result = stage_main(
        prepare_data.STAGE, prepare_data.run, ["--config", config_uri, "--run-key", key]
    )
    data_uri = result["outputs"][DATA]
    print(storage.read_bytes(storage.join(data_uri, DATA_REPORT_FILE)).decode())
    print(f"data: {data_uri}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.data.demo_corpus import write_demo_data

    write_demo_data(Path(args.out))
    print(f"wrote {args.out}/domain.jsonl and {args.out}/instructions.jsonl")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the DAG on the demo config and print where to look."""
    from pipeline.devstack.demo import run_demo

    return run_demo(args.config, parse_overrides(args.set))


def image_tag() -> str:
    """The images' tag for this checkout: the code version (``0.1.0+src.<hash>``) with ``+``
    spelled ``-`` (not allowed in a tag). It changes with the code, so a tag never names two
    builds, and a run's stages never meet code it was not resolved with by a re-pushed tag."""
    from pipeline.identity import code_version

    return code_version().replace("+", "-")


def cmd_image_tag(args: argparse.Namespace) -> int:
    print(image_tag())
    return 0


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
    from pipeline.planning.adapters import METHODS

    plan.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="plan full-weight training or a LoRA / QLoRA adapter (default: the section's "
        "method in the config)",
    )
    plan.add_argument(
        "--rank", type=int, default=None, help="adapter rank (default: the section's adapter.rank)"
    )
    plan.add_argument(
        "--lora-dropout",
        type=float,
        default=None,
        help="adapter dropout (default: the section's adapter.dropout)",
    )
    plan.add_argument(
        "--compare-methods",
        action="store_true",
        help="one row per method (full, lora, qlora): each one's plan on this model and pool",
    )
    plan.set_defaults(func=cmd_plan)

    demo_data = sub.add_parser("demo-data", help="regenerate the demo corpus and instruction set")
    demo_data.add_argument("--out", default=str(REPO_ROOT / "configs" / "demo_data"))
    demo_data.set_defaults(func=cmd_demo_data)

    tag = sub.add_parser(
        "image-tag", help="print the tag both images of this checkout are built and pushed as"
    )
    tag.set_defaults(func=cmd_image_tag)

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
