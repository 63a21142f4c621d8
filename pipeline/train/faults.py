"""Fault injection for failure drills: kill a worker, or poison a loss, at a chosen step.

The recovery paths (worker restarts, resume from the newest complete checkpoint, the
non-finite guard) only deserve trust if they are exercised on the real code. Set
``PIPELINE_FAULTS`` in the Ray job's environment (``runtime_env.env_vars``) to a ``;``-separated
list of ``kind:key=value:...`` items:

- ``sigkill:rank=1:step=3`` kills rank 1 with SIGKILL at the end of optimizer step 3 (after
  its checkpoint, if step 3 writes one);
- ``stall:rank=0:step=4`` hangs rank 0 at the end of step 4, as a worker stuck in a collective
  would, until the job is stopped;
- ``sigkill_in_checkpoint:rank=0:step=4`` kills rank 0 after its shards of the step-4
  checkpoint are written, before the checkpoint is committed;
- ``nan_loss:rank=0:step=3-5`` makes rank 0's loss NaN in steps 3 to 5; ``:micro=1`` limits
  it to the second micro-batch of each step (after the first one's backward ran).

A kill or stall fires once per checkpoint folder on a machine (a marker file under the temp
dir), so the restarted worker group, or the next job, runs on. Unset, nothing here does
anything.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PIPELINE_FAULTS"
KINDS = ("sigkill", "stall", "sigkill_in_checkpoint", "nan_loss")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    first_step: int
    last_step: int
    micro: int | None = None
    """Micro-batch of the step a ``nan_loss`` poisons; None: every one."""

    def hits(self, rank: int, step: int) -> bool:
        return rank == self.rank and self.first_step <= step <= self.last_step


def parse_faults(spec: str) -> list[Fault]:
    """Parse a ``PIPELINE_FAULTS`` value.

    Raises:
        ValueError: an item is malformed; the message quotes it and the expected form.
    """
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kind, *pairs = item.split(":")
        fields = dict(pair.partition("=")[::2] for pair in pairs)
        if kind not in KINDS or not {"rank", "step"} <= set(fields) <= {"rank", "step", "micro"}:
            raise ValueError(
                f"{ENV_VAR} item {item!r}: expected KIND:rank=R:step=S[-E][:micro=M] with KIND "
                f"in {KINDS}"
            )
        first, _, last = fields["step"].partition("-")
        micro = int(fields["micro"]) if "micro" in fields else None
        faults.append(Fault(kind, int(fields["rank"]), int(first), int(last or first), micro))
    return faults


def active_faults() -> list[Fault]:
    return parse_faults(os.environ.get(ENV_VAR, ""))


def should_poison_loss(faults: list[Fault], rank: int, step: int, micro: int) -> bool:
    return any(
        f.kind == "nan_loss" and f.hits(rank, step) and f.micro in (None, micro) for f in faults
    )


def _fire_once(fault: Fault, scope: str) -> bool:
    """True the first time ``fault`` fires for ``scope`` on this machine (a marker file)."""
    marker = (
        Path(tempfile.gettempdir())
        / "pipeline-faults"
        / hashlib.sha256(f"{fault}|{scope}".encode()).hexdigest()[:24]
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def maybe_kill(faults: list[Fault], kind: str, rank: int, step: int, scope: str) -> None:
    """SIGKILL this process if a ``kind`` fault targets this rank and step, once per ``scope``
    (the checkpoint folder), so the restarted worker group runs on."""
    for fault in faults:
        if fault.kind == kind and fault.hits(rank, step) and _fire_once(fault, scope):
            os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(faults: list[Fault], rank: int, step: int, scope: str) -> None:
    """Hang this process if a ``stall`` fault targets this rank and step, once per ``scope``."""
    for fault in faults:
        if fault.kind == "stall" and fault.hits(rank, step) and _fire_once(fault, scope):
            while True:
                time.sleep(60)
