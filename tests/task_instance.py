"""A stand-in for the runtime task instance, as much of it as RayJobOperator uses. Plain
dataclasses only: the Airflow image probe (tests/airflow_image.py) imports it where pytest
and the training stack cannot be imported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeTaskInstance:
    """The part of the runtime task instance the operator uses."""

    run_id: str
    dag_id: str = "ray_it"
    task_id: str = "stage"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value
