"""The import rules of the layout, over the real import graph (every ``import``, also inside
functions): stages share only the library and ``pipeline.contract``; the libraries never reach
up into stages; the Airflow side never pulls in training or evaluation; the dev stack
(``pipeline.devstack``: local Ray head, PostgreSQL, MLflow, the demo) may import the library, but
nothing deployed (a stage, the Airflow side) reaches it; no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_SIDE = ("dags.", "plugins.", "pipeline.form", "pipeline.preflight", "pipeline.data_watch")
HEAVY = ("pipeline.stages.", "pipeline.train.", "pipeline.eval.")
DEV_STACK = "pipeline.devstack"  # dev tooling: what `make demo` and the tests start locally
SHARED_BY_STAGES = "pipeline.stages.entrypoint"  # the harness every stage runs under


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("dags/*.py"), *ROOT.glob("plugins/**/*.py")]
    names = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    # The plugin folder is on Airflow's path: its package imports as ``ray_jobs``.
    aliases = {n.removeprefix("plugins."): n for n in names if n.startswith("plugins.")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found = {aliases.get(m, m) for m in found}
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    def stage(m: str) -> bool:
        return m.startswith("pipeline.stages.") and m != SHARED_BY_STAGES

    found = []
    for module, imports in graph.items():
        for target in imports:
            edge = f"{module} -> {target}"
            if stage(module) and stage(target):
                found.append(f"stage imports stage: {edge}")
            if module.startswith(("pipeline.data.", "pipeline.train.", "pipeline.eval.")) and (
                target.startswith("pipeline.stages.")
            ):
                found.append(f"library imports stages: {edge}")
            if module.startswith("pipeline.data.") and target.startswith("pipeline.train."):
                found.append(f"data imports train: {edge}")
    for module in graph:
        if module.startswith(AIRFLOW_SIDE):
            found += [f"Airflow side reaches {m}: {module}" for m in _reach(graph, module)
                      if m.startswith(HEAVY)]  # fmt: skip
        if module.startswith((*AIRFLOW_SIDE, "pipeline.stages.")):
            found += [f"deployed code reaches the dev stack {m}: {module}"
                      for m in _reach(graph, module) if m.startswith(DEV_STACK)]  # fmt: skip
    found += [
        f"import cycle through {module}" for module in graph if module in _reach(graph, module)
    ]
    return sorted(found)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def test_the_layout_keeps_its_import_rules() -> None:
    graph = import_graph()
    assert {"pipeline.contract", "pipeline.models", "pipeline.identity"} <= set(graph)
    assert {"pipeline.preflight", "pipeline.devstack.host", "pipeline.devstack.demo"} <= set(graph)
    assert "ray_jobs.operators" not in graph and "plugins.ray_jobs.operators" in graph
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        # The cycles and reaches this layout removed (2026-12-03), each put back alone.
        ({"pipeline.data.tokenizer": {"pipeline.train.model"},
          "pipeline.train.model": {"pipeline.data.tokenizer"}}, "data imports train"),
        ({"pipeline.stages.evaluate": {"pipeline.stages.prepare_data"}}, "stage imports stage"),
        ({"pipeline.stages.promote": {"pipeline.stages.evaluate"}}, "stage imports stage"),
        ({"pipeline.preflight": {"pipeline.identity"},
          "pipeline.identity": {"pipeline.stages.entrypoint"}}, "Airflow side reaches"),
        # The dev stack stays out of what is deployed, directly or through the library.
        ({"pipeline.stages.entrypoint": {"pipeline.devstack.host"}}, "deployed code reaches"),
        ({"pipeline.stages.continued_pretraining": {"pipeline.train.ray_train"},
          "pipeline.train.ray_train": {"pipeline.devstack.local_training"}},
         "deployed code reaches"),
        ({"pipeline.preflight": {"pipeline.devstack.demo"}}, "deployed code reaches"),
        ({"pipeline.contract": {"pipeline.storage"},
          "pipeline.storage": {"pipeline.contract"}}, "import cycle"),
    ],
)  # fmt: skip
def test_each_former_violation_is_caught(edges: dict[str, set[str]], expected: str) -> None:
    graph = import_graph()
    for module, targets in edges.items():
        graph[module] = graph.get(module, set()) | targets
    assert any(v.startswith(expected) for v in violations(graph)), violations(graph)
