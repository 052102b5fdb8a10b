"""Checkpoints of the server-based comparison (mode=federated), and resuming it (`resume=RUN_FOLDER`).

Each member checkpoints itself: ``<member folder>/checkpoint.pt`` (fedepic.checkpoint, plain data
only), written after every ``checkpoint_every``-th round but the last, once that round's metrics line
is on disk and the round passed the failure check (a round that failed the run is redone). It holds
what decides the rounds to come: the global model, the strategy's state (strategies.server), the
Tally, recalls, first diverged round and non-finite count, the curves, and every client's local EPIC
state (the server holds those, see client_app.py); centralized-epic saves its model, EPIC mask and
`fit`'s optimizer, scheduler and generator state. It records the length of the member's and the
root's metrics.jsonl.

A resumed run (fedepic.lifecycle, which reads the checkpoints before the folder is touched, so an
unreadable one is a one-line ConfigError) keeps finished members as they are and takes their rows and
curves from their summary.json (:func:`kept_row_and_curves`); the interrupted member continues after
its checkpointed round, its metrics.jsonl cut back to the checkpoint; a member without a checkpoint
starts over in a cleared folder.

The root metrics.jsonl holds a "clients_ready" line (the warm-up, before the first member) and one
"member" line per finished member, and gets no line while a member runs. :func:`restore_root` cuts it
back to the longest prefix an uninterrupted run also writes: an optional clients_ready line, then the
finished members' lines in order (a torn last line, or the line of a member that finished just
before the interruption but was not logged, falls out and is logged again). The resumed run logs
clients_ready only when that prefix lacks it, so the file equals the uninterrupted run's apart from
timing: the first session's warm-up time stays. (The root length a checkpoint records equals that
prefix, since members run one after another; the prefix also covers the cases without a checkpoint.)
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Optional

from fedepic.checkpoint import CHECKPOINT, metrics_size, save_checkpoint, truncate_metrics
from fedepic.outputs import RunWriter

# summary.json keys that are not the member's comparison row: RunWriter's own, and the curves
SUMMARY_ONLY = ("status", "curves", "wall_seconds", "versions", "lock")


def kept_row_and_curves(summary: dict) -> tuple[dict, dict[str, list[float]]]:
    """A finished member's row and curves from its summary.json (JSON null is NaN in a curve)."""
    row = {k: v for k, v in summary.items() if k not in SUMMARY_ONLY}
    curves = {k: [math.nan if v is None else float(v) for v in values] for k, values in summary["curves"].items()}
    return row, curves


def restore_root(writer: RunWriter, finished: list[str]) -> tuple[bool, list[str]]:
    """Cut the root metrics.jsonl to the prefix an uninterrupted run also writes (module docstring),
    ``finished`` being the members the interrupted run completed, in order; returns whether the prefix
    holds the clients_ready line, and the members whose line it holds."""
    path, size, ready, logged = writer.dir / "metrics.jsonl", 0, False, []
    expected = list(finished)
    lines = path.read_bytes().splitlines(keepends=True) if path.exists() else []
    for line in lines:
        record = _record(line)
        if record.get("event") == "clients_ready" and not ready and not logged:
            ready = True
        elif (record.get("event") == "member" and len(logged) < len(expected)
              and record.get("strategy") == expected[len(logged)]):
            logged.append(expected[len(logged)])
        else:
            break
        size += len(line)
    truncate_metrics(writer.dir, size)
    return ready, logged


def _record(line: bytes) -> dict:
    """One whole metrics line as a dict; {} for a torn or unreadable one."""
    try:
        record = json.loads(line) if line.endswith(b"\n") else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def save_member_checkpoint(member: RunWriter, state: dict[str, Any], started: float) -> None:
    """``state`` (plain data) to the member's checkpoint, with the member's time so far (since
    ``started``, a perf_counter reading) and the lengths of its and the root's metrics.jsonl."""
    member.flush()
    root = member.parent
    if root is not None:
        root.flush()
    offsets = {"member": metrics_size(member.dir), "": metrics_size(root.dir) if root is not None else 0}
    save_checkpoint(member.dir / CHECKPOINT, {**state, "elapsed_seconds": time.perf_counter() - started,
                                              "offsets": offsets})


def elapsed(saved: Optional[dict]) -> float:
    """Seconds the member ran before this session (0 when it starts here)."""
    return float(saved["elapsed_seconds"]) if saved is not None else 0.0
