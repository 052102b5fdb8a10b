"""A run folder's metrics as TensorBoard event files (``log.tensorboard=true``), beside metrics.jsonl.

TensorBoard is where many users already look at training curves (TensorFlow team, "TensorBoard:
TensorFlow's visualization toolkit", https://www.tensorflow.org/tensorboard). Each record a run folder
logs to ``metrics.jsonl`` (:meth:`fedepic.outputs.RunWriter.log`) is also written, through torch's
``torch.utils.tensorboard.SummaryWriter``, as scalars at the record's step: every member's folder holds
its own event file, so ``tensorboard --logdir RUN_FOLDER`` shows the members side by side. The run
folder stays the source of truth; the event files are a view of ``metrics.jsonl``.

A record becomes scalars by :func:`scalars`: the step is the record's ``round``, else ``epoch``, else
``step`` (an int); every other number is one scalar tagged with its key, a list of numbers one scalar
per item (``per_class/0``, ``per_class/1``, ...), a mapping its numbers under ``key/inner``; booleans
and texts are left out, and so is a key whose value is ``null`` (a figure the record does not have); a
``null`` inside a list (metrics.jsonl's NaN) is written as NaN, so the items keep their positions.

>>> scalars({"round": 3, "accuracy": 0.5, "per_class": [0.25, None], "failures": [], "ok": True})
(3, {'accuracy': 0.5, 'per_class/0': 0.25, 'per_class/1': nan})

A record with none of those keys (the root folder's ``clients_ready`` or ``member`` lines) takes its
index in metrics.jsonl as its step: the writer counts on from the lines the file already holds
(``start``), so a resumed session continues the first session's steps instead of restarting at 0.

A resumed run logs again the records after its checkpoint (fedepic.checkpoint.truncate_metrics cut them
from metrics.jsonl): the writer opened for it purges the events at or after the first step it logs
(SummaryWriter's ``purge_step``), so the event files follow the truncated file: the events of the lines
kept stay, those of the lines cut go (tests/test_tensorboard.py resumes an interrupted run).

Cost: one event per scalar, appended to a buffered file (flushed with metrics.jsonl and when the folder
closes); importing tensorboard takes about a second, paid only when the key is on.
Deviation: none; torch's writer and tensorboard's file format are used as they are.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

STEP_KEYS = ("round", "epoch", "step")  # the x axis of a record, in the order looked for


def _number(value: Any) -> Optional[float]:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _flatten(tag: str, value: Any, out: dict[str, float]) -> None:
    number = _number(value)
    if number is not None:
        out[tag] = number
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if item is None or not isinstance(item, (list, tuple, Mapping)):
                _flatten(f"{tag}/{index}", item, out)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{tag}/{key}", item, out)


def scalars(record: Mapping[str, Any], fallback_step: int = 0) -> tuple[int, dict[str, float]]:
    """The step of a metrics.jsonl record and its scalars (tag -> value); see the module docstring."""
    step_key = next((k for k in STEP_KEYS if isinstance(record.get(k), int) and not isinstance(record[k], bool)),
                    None)
    step = record[step_key] if step_key is not None else fallback_step
    out: dict[str, float] = {}
    for key, value in record.items():
        if key != step_key and value is not None:
            _flatten(key, value, out)
    return step, out


def line_count(path: Path) -> int:
    """The complete lines of ``path`` (0 when it does not exist); a link there is refused (ELOOP)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def newest_event_second(folder: Path) -> int:
    """The largest wall-clock second in the names of the folder's event files
    (``events.out.tfevents.<seconds>.<host>.<pid>.<n>``), or -1 without one."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    return max(seconds, default=-1)


def wait_for_a_later_second(folder: Path, clock: Any = time.time, sleep: Any = time.sleep) -> None:
    """Wait until the clock's second is past the newest event file's. TensorBoard reads a folder's event
    files in name order, and a name starts with its writer's second: a resumed writer opened in the same
    second as the cut one may sort first (its counter ".12" before ".3"), and its events would then be
    read before the older file's, which TensorBoard takes for a restart that purges them (at most 1 s)."""
    newest = newest_event_second(folder)
    while int(clock()) <= newest:
        sleep(0.05)


class ScalarLog:
    """The event files of one run folder: :meth:`write` each metrics.jsonl record as it is logged.

    Parameters
    ----------
    folder : Path
        The run or member folder; the event file goes there, beside metrics.jsonl.
    resuming : bool
        The folder was reopened by a resume: the first record written purges the events at or after
        its step.
    start : int
        The records metrics.jsonl holds before the first one written here (after a resume's truncation):
        the index, and so the fallback step, of that first record.
    """

    def __init__(self, folder: Path, resuming: bool, start: int = 0) -> None:
        self.folder, self.resuming = folder, resuming
        self._writer: Any = None
        self._count = start

    def write(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record, self._count)
        self._count += 1
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            if self.resuming:
                wait_for_a_later_second(self.folder)
            self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=step if self.resuming else None)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
