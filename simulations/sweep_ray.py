"""The parallel executor of a sweep (``sweep.parallel``, the default): every pending cell one Ray task,
on a local Ray instance or on the cluster at ``ray.address``. fedepic.sweep.run runs the same cells
one at a time without Ray; both write the same folder.

- Scheduling, placement and retries are Ray's. Each cell is a task that declares ``sweep.cell_cpus``
  and ``sweep.cell_gpus``; all are submitted at once and Ray starts each where its resources are free.
  A task whose worker process dies (out of memory, a lost node) runs again, ``sweep.max_retries``
  times; a cell that raises is not retried: it failed, and the others go on.
- A task runs its cell in process (fedepic.sweep.cells.execute_cell: the mode's runner on the cell's
  in-process engine, torch threads = the cell's train.threads) in a temporary folder on its node, and
  returns the run folder's files; the driver writes them to ``cells/<name>``. A cell that continues a
  stopped run gets that folder's files with its task. Nothing assumes a shared file system (tested on
  a local instance only: no multi-node cluster was at hand).
- A cell with ``engine=ray`` would start a Flower simulation inside a Ray task; the plan refuses it
  (fedepic.sweep.plan): such cells run with ``sweep.parallel=false``.
- Stopping: SIGINT or SIGTERM at the driver sets a flag in a small actor (:class:`SweepControl`).
  Each running task polls it and interrupts its cell as that signal would (the runner marks the cell
  "interrupted" and keeps its checkpoint), and returns its folder; a task not yet started returns at
  once. ``ray.cancel`` is not used on running cells: a cancelled task's return value, the folder, is lost.
"""

from __future__ import annotations

import _thread
import dataclasses
import os
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Iterator, Optional

import ray

from fedepic.config import RunConfig
from fedepic.interrupts import Interrupts
from fedepic.progress import progress_bars
from fedepic.sweep.cells import CellOutcome, execute_cell, install_folder, pack_folder, unpack_folder
from fedepic.sweep.plan import Cell
from fedepic.sweep.run import SweepRun, cell_config
from simulations.flower_runtime import backend_config, quiet_flower, ray_leaves_sigterm_alone

POLL_S = 1.0  # how often the driver refreshes its counts, and a running task looks for a stop
NICENESS = "RAY_worker_niceness"  # Ray's setting of its workers' niceness (default 15)


@ray.remote(num_cpus=0)
class SweepControl:
    """What the driver and the running tasks share: which cells started, and whether to stop (and by
    which signal)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.started: set[int] = set()

    def stop(self, signum: int) -> None:
        self.signum = signum

    def stopping(self) -> Optional[int]:
        return self.signum

    def start(self, index: int) -> None:
        self.started.add(index)

    def started_cells(self) -> set[int]:
        return set(self.started)


def run_cell_task(spec: dict[str, Any], control: Any) -> dict[str, Any]:
    """A Ray task: run one cell here and return its run folder's files (module docstring)."""
    if _stop_signal(control) is not None:
        return {"started": False}
    control.start.remote(spec["index"])
    interrupts, outcome = Interrupts(), None
    with tempfile.TemporaryDirectory(prefix="fedepic-cell-") as tmp:
        resume = unpack_folder(spec["resume"], Path(tmp, "resume", spec["name"]).resolve()) if spec["resume"] else None
        try:
            with interrupts, _stop_watch(control):
                outcome = execute_cell(spec["config"], Path(tmp, "run"), interrupts=interrupts, resume=resume)
        except KeyboardInterrupt:  # the stop came as the cell ended: its outcome stands
            pass
        outcome = outcome or CellOutcome("interrupted", None, "stopped before the cell began")
        files = pack_folder(outcome.folder) if outcome.folder is not None else None
    return {"started": True, "outcome": dataclasses.replace(outcome, folder=None), "files": files,
            "node": socket.gethostname()}


def _stop_signal(control: Any) -> Optional[int]:
    """The sweep's stop signal (None: go on), asked off the task's main thread. A blocking ``ray.get``
    on a task's main thread lends its CPUs back to Ray while it waits ("yielding resources while
    blocked"), and Ray starts another cell in them: more cells would run than ``sweep.cell_cpus``
    allows. Ray does this only for the main thread, so the question goes through a helper thread that
    the main thread joins (a join is no Ray call)."""
    answer: list[Optional[int]] = []
    asker = threading.Thread(target=lambda: answer.append(ray.get(control.stopping.remote())),
                             name="fedepic-sweep-ask", daemon=True)
    asker.start()
    asker.join()
    if not answer:
        raise RuntimeError("the sweep's control actor did not answer")
    return answer[0]


@contextmanager
def _stop_watch(control: Any) -> Iterator[None]:
    """While inside, a thread polls ``control`` (off the main thread, so the task keeps its CPUs:
    :func:`_stop_signal`) and, once the sweep stops, interrupts this task's main thread as that signal
    would (our handler there, from the cell's Interrupts, marks the run)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            signum = ray.get(control.stopping.remote())
            if signum is not None:
                _thread.interrupt_main(signum)
                return

    thread = threading.Thread(target=watch, name="fedepic-sweep-stop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _workers_at_our_priority(cfg: RunConfig) -> Iterator[None]:
    """While a local Ray instance starts: its workers at niceness 0, unless RAY_worker_niceness says
    otherwise. Ray starts workers at nice 15 to keep its own daemons responsive; but the cells are this
    command's work (the one-at-a-time executor runs them at its own priority), and on a shared machine
    a nice-15 worker gets about 3% of a core that a nice-0 process wants (CFS weights 36 against 1024;
    docs/results/engines.md). An attached cluster keeps its own setting."""
    if cfg.ray.address or NICENESS in os.environ:
        yield
        return
    os.environ[NICENESS] = "0"  # read by the raylet this ray.init starts
    try:
        yield
    finally:
        del os.environ[NICENESS]


def _spec(run: SweepRun, cell: Cell) -> dict[str, Any]:
    resume = run.resume_folder(cell)
    return {"index": cell.index, "name": cell.name, "config": cell_config(cell, progress=False),
            "resume": pack_folder(resume) if resume is not None else None}


def run_on_ray(run: SweepRun) -> None:
    """Every pending cell of ``run`` as a Ray task (module docstring); returns when all came back.
    On SIGINT/SIGTERM the running cells are interrupted and collected, then RunInterrupted propagates.

    The signals are polled here, never raised where they land: the driver runs Ray's threads and
    finalizers, and an exception raised inside one of those (logging's lock release, say) was printed
    as "Exception ignored" with its traceback and lost. ``_collect`` raises it within ``POLL_S``."""
    quiet_flower()
    settings, pending = run.plan.settings, run.pending()
    with run.interrupts.polled():
        # stdout keeps only the folder line
        with redirect_stdout(sys.stderr), ray_leaves_sigterm_alone(), _workers_at_our_priority(run.plan.base):
            ray.init(**backend_config(run.plan.base)["init_args"])
        try:
            control = SweepControl.remote()
            task = ray.remote(run_cell_task).options(num_cpus=settings.cell_cpus, num_gpus=settings.cell_gpus,
                                                     max_retries=settings.max_retries, retry_exceptions=False)
            refs = {task.remote(_spec(run, cell), control): cell for cell in pending}
            with progress_bars(run.plan.base.progress) as progress:
                run.progress_bar(progress)
                try:
                    _collect(run, refs, control, interruptible=True)
                except KeyboardInterrupt as err:
                    # further signals are ignored while the cells come back
                    ray.get(control.stop.remote(getattr(err, "signum", None) or signal.SIGINT))
                    _collect(run, refs, control, interruptible=False)
                    raise
        finally:
            ray.shutdown()


def _collect(run: SweepRun, refs: dict[Any, Cell], control: Any, *, interruptible: bool) -> None:
    """Record every task of ``refs`` as it returns (removing it), showing the running ones meanwhile;
    ``interruptible``: a signal that arrived while a folder was written raises once it is written."""
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
        started = ray.get(control.started_cells.remote())
        for cell in refs.values():
            if cell.index in started and run.states[cell.index].status != "running":
                run.mark_running(cell)
        for ref in done:
            cell = refs.pop(ref)
            with run.interrupts.polled():  # the folder lands whole, whatever arrives now
                _record(run, cell, ref)
        if interruptible:
            run.interrupts.raise_if_stopped()


def _record(run: SweepRun, cell: Cell, ref: Any) -> None:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:  # the task itself broke (its worker died past its retries, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        run.record(cell, CellOutcome("failed", None, f"{type(err).__name__}: {first}"), None)
        return
    if not result["started"]:
        return  # the sweep stopped before this cell began: it stays as it was
    folder = install_folder(result["files"], run.cells_dir, cell.name) if result["files"] else None
    run.record(cell, result["outcome"], folder, result["node"])
