"""A sweep's folder from its start to every end, and the executor that runs its cells one at a time here.

Folder ``output_dir/sweep-<name>-<key>/`` (the key: fedepic.sweep.plan), built as ``.NAME.partial``
while a session runs and renamed when it ends, like a run folder:

- ``config.yaml``: the resolved config, its ``sweep`` section included;
- ``cells/<NNN-values>/``: one ordinary run folder per cell (config.yaml, metrics.jsonl, summary.json,
  member sub-folders...);
- ``tables/``, ``tables.md``, ``figures/``: the aggregates of the completed cells (fedepic.sweep.report);
- ``metrics.jsonl``: a line when a session starts (the cells it runs) and one per cell that ends;
- ``summary.json``: ``status``; the ``axes``, ``zip``, ``row_axes``, ``member_axis``; ``cells`` (index,
  name, folder, axis values, status, error, seconds, node); ``counts``; ``aggregates`` (per metric,
  mean / se / n / seeds of every setting and member); the ``tables`` and ``figures`` files;
- ``report.html``: all of it on one self-contained page (fedepic.sweep.page), written after the summary.

Running the same sweep again (the same command, or ``resume=SWEEP_FOLDER``) reopens the folder: a cell
whose summary says completed is kept as it is, one interrupted, failed or killed continues in its
folder from its last checkpoint (fedepic.checkpoint.resume_config), and one never started runs. A
lock file keeps a second process out while one runs the sweep.

On every exit path, inside ``Interrupts.polled`` (a signal cannot cut it short), the summary gets a
true status: ``completed`` when every cell completed; ``failed`` when a cell failed (the others ran) or
the sweep itself broke; ``interrupted`` on SIGINT or SIGTERM (the running cells are marked interrupted
and keep their checkpoints). The tables and figures cover the completed cells.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from fedepic.config import RunConfig, to_yaml
from fedepic.errors import ConfigError, RunInterrupted
from fedepic.interrupts import Interrupts
from fedepic.lifecycle import FolderLifecycle
from fedepic.outputs import RunWriter
from fedepic.progress import Bar, bar, progress_bars
from fedepic.report import best_effort
from fedepic.sweep import aggregate
from fedepic.sweep.cells import CELLS, CellOutcome, existing_folder, execute_cell, folder_status, place_folder
from fedepic.sweep.plan import REPLICATE_AXIS, Cell, SweepPlan, plan_sweep
from fedepic.sweep.page import write_sweep_report
from fedepic.sweep.report import setting_text, write_report

STAGING = ".staging"  # cells that run here write their run folder below it first


@dataclass
class CellState:
    """What the sweep knows of a cell: its status and, once it ran in this session, how it ended."""

    status: str
    error: Optional[str] = None
    traceback: Optional[str] = None
    seconds: Optional[float] = None
    node: Optional[str] = None
    ran: bool = False


@dataclass
class SweepOutcome:
    """What the command reports: the sweep folder and the cells that failed."""

    folder: Path
    failed: list[str] = field(default_factory=list)


class SweepRun(FolderLifecycle):
    """The folder of ``plan`` at ``folder`` (new, or reopened) for one session; a context manager
    (fedepic.lifecycle.FolderLifecycle: a true summary on every exit path).

    Parameters
    ----------
    plan : SweepPlan
        The validated sweep.
    folder : Path
        Where the folder is (or is made): its final name; a ``.NAME.partial`` beside it is reopened too.
    interrupts : Interrupts
        The caller's SIGINT/SIGTERM handling.
    """

    def __init__(self, plan: SweepPlan, folder: Path, interrupts: Interrupts) -> None:
        self.plan, self.interrupts = plan, interrupts
        existing = existing_folder(folder.parent, folder.name)
        if existing is not None:  # RunWriter locks it, and refuses links in it, before anything in it changes
            self.root = RunWriter(folder.parent, folder.name, resume=existing, lock_key="sweep", kind="sweep")
        else:  # a new folder named exactly ``folder``: RunWriter names it "<stamp>-<name>"
            assert folder.name.startswith("sweep-"), folder
            self.root = RunWriter(folder.parent, folder.name.removeprefix("sweep-"), stamp="sweep", lock_key="sweep",
                                  kind="sweep")
        self.states = {c.index: CellState("pending") for c in plan.cells}  # read from the folder by start()
        self.outcome = SweepOutcome(self.root.path)
        self.bar: Optional[Bar] = None

    # ------------------------------------------------------------------ start and end

    def start(self) -> None:
        self.root.write_config(to_yaml(self.plan.config))
        self._recover_staging()
        self.states = {c.index: CellState(folder_status(existing_folder(self.cells_dir, c.name)))
                       for c in self.plan.cells}
        settings = self.plan.settings
        self.root.log({"event": "session", "pid": os.getpid(), "node": socket.gethostname(),
                       "parallel": settings.parallel, "cell_cpus": settings.cell_cpus, "cell_gpus": settings.cell_gpus,
                       "pending": [c.name for c in self.pending()]})

    def finish(self, exc: Optional[BaseException]) -> None:
        """Statuses, aggregates and the summary of this session's end (FolderLifecycle runs it on every
        exit path; the folder's lock goes after its rename, RunWriter.close)."""
        # a cell that ended but was not yet recorded (a signal came between) keeps its folder
        for cell in self._recover_staging():
            if self.states[cell.index].status == "running":
                self.states[cell.index] = replace(self.states[cell.index], status=folder_status(
                    existing_folder(self.cells_dir, cell.name)))
        for state in self.states.values():
            if state.status == "running":  # cut short without an outcome (the sweep itself broke)
                state.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        self.root.mark(exc)
        # every cell that did not complete (failed, killed, interrupted by its own run): the command exits 1
        self.outcome.failed = [c.name for c in self.plan.cells if self.states[c.index].status != "completed"]
        if exc is None and any(s.status != "completed" for s in self.states.values()):
            self.root.status = "failed"  # a cell failed (the others ran): not "completed"
        summary: dict[str, Any] = {}
        try:
            summary = self._aggregate()
        except Exception as err:  # the sweep's numbers are wrong or missing: not "completed"
            self.root.mark(err)
            summary = {"error": f"the aggregation failed: {type(err).__name__}: {err}"}
            raise
        finally:  # the summary is written even if the aggregation broke
            self.root.write_summary({**self._description(), **summary})
            best_effort("the sweep's report.html", lambda: write_sweep_report(self.root))

    def _description(self) -> dict[str, Any]:
        plan = self.plan
        counts: dict[str, int] = {}
        for state in self.states.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        cells = []
        for cell in plan.cells:
            state = self.states.get(cell.index, CellState("pending"))
            folder = existing_folder(self.cells_dir, cell.name)
            cells.append({"index": cell.index, "name": cell.name, "folder": f"{CELLS}/{folder.name}" if folder else None,
                          "values": cell.values, "status": state.status, "error": state.error,
                          "traceback": state.traceback, "seconds": _cell_seconds(state, folder), "node": state.node,
                          "ran_this_session": state.ran})
        # wall_seconds (RunWriter) is this session's; a resumed sweep's cells ran over several sessions
        return {"kind": "sweep", "name": plan.base.name, "mode": plan.base.mode, "key": plan.key,
                "cells_seconds": sum(c["seconds"] or 0.0 for c in cells),
                "setting": setting_text(plan.base), "axes": plan.axes, "zip": plan.zips,
                "replicate_axis": REPLICATE_AXIS if REPLICATE_AXIS in plan.axes else None,
                "member_axis": plan.member_axis, "row_axes": plan.row_axes, "counts": counts, "cells": cells}

    def _aggregate(self) -> dict[str, Any]:
        """The tables and figures of the completed cells, and their numbers for the summary."""
        done = [aggregate.CellData(c.values, c.config.seed, _read_summary(folder), folder)
                for c in self.plan.cells if self.states[c.index].status == "completed"
                and (folder := existing_folder(self.cells_dir, c.name)) is not None]
        if not done:
            return {"metrics": [], "aggregates": {}, "tables": [], "figures": []}
        settings = self.plan.settings
        metrics = settings.metrics if settings.metrics is not None else aggregate.table_metrics(done)
        curve_metrics = settings.curves if settings.curves is not None else aggregate.curve_metrics(done)
        tables = aggregate.tables(done, self.plan.row_axes, metrics)
        curve_sets = aggregate.curves(done, self.plan.row_axes, curve_metrics)
        files = write_report(self.root, tables, curve_sets, setting_text(self.plan.base), self.plan.base.figures)
        return {"metrics": list(metrics), "curves": list(curve_metrics),
                "aggregates": {t.metric: t.records() for t in tables}, **files}

    # ------------------------------------------------------------------ cells

    @property
    def cells_dir(self) -> Path:
        return self.root.dir / CELLS

    def pending(self) -> list[Cell]:
        """The cells still to run, in grid order: every one whose folder does not say completed."""
        return [c for c in self.plan.cells if self.states[c.index].status != "completed"]

    def resume_folder(self, cell: Cell) -> Optional[Path]:
        """The stopped run folder ``cell`` continues in, as it is on disk (its final name, or the
        ``.NAME.partial`` of a killed run, whose files a parallel executor packs), or None (it starts anew)."""
        return existing_folder(self.cells_dir, cell.name)

    def staging(self, cell: Cell) -> Path:
        """An empty work folder for a cell that runs in this process."""
        path = self.root.dir / STAGING / cell.name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _recover_staging(self) -> list[Cell]:
        """Run folders left in the staging area (by a killed session, or a cell whose end a signal cut
        off before it was recorded) go where a resume finds them; returns their cells."""
        staging = self.root.dir / STAGING
        by_name = {c.name: c for c in self.plan.cells}
        recovered = []
        for work in sorted(staging.iterdir()) if staging.is_dir() else []:
            runs = sorted(p for p in work.iterdir() if p.is_dir())
            if runs and existing_folder(self.cells_dir, work.name) is None:
                self.cells_dir.mkdir(exist_ok=True)
                os.replace(runs[-1], self.cells_dir / work.name)
                if work.name in by_name:
                    recovered.append(by_name[work.name])
        shutil.rmtree(staging, ignore_errors=True)
        return recovered

    def mark_running(self, cell: Cell) -> None:
        self.states[cell.index] = replace(self.states[cell.index], status="running")
        self.show()

    def record(self, cell: Cell, outcome: CellOutcome, folder: Optional[Path], node: Optional[str] = None) -> None:
        """The cell ended: its folder (already under cells/) and how it ended; one metrics line."""
        # the folder's own summary is the truth (a signal just after a run completed leaves it completed)
        status = folder_status(folder) if folder is not None else outcome.status
        error = None if status == "completed" else outcome.error
        self.states[cell.index] = CellState(status, error, outcome.traceback, round(outcome.seconds, 3),
                                            node or socket.gethostname(), ran=True)
        self.root.log({"event": "cell", "index": cell.index, "name": cell.name, "status": status,
                       "seconds": outcome.seconds, "error": error, "node": node or socket.gethostname()})
        if self.bar is not None:
            self.bar.advance(info=self._counts())

    def show(self) -> None:
        if self.bar is not None:
            self.bar.advance(0, info=self._counts())

    def _counts(self) -> str:
        states = self.states.values()
        count = {s: sum(st.status == s for st in states) for s in ("completed", "failed", "running")}
        return f"done {count['completed']}  failed {count['failed']}  running {count['running']}"

    def progress_bar(self, progress: Any) -> Bar:
        """The bar over cells: finished / failed / running counts and an ETA (rich's, from the pace so far)."""
        done = sum(s.status == "completed" for s in self.states.values())
        self.bar = bar(progress, f"sweep {self.plan.base.name}", len(self.plan.cells), completed=done)
        self.show()
        return self.bar


def _read_summary(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text())


def _cell_seconds(state: CellState, folder: Optional[Path]) -> Optional[float]:
    """How long the cell ran: this session's measure, else its own summary's wall time (an earlier session)."""
    if state.seconds is not None or folder is None:
        return state.seconds
    try:
        return _read_summary(folder).get("wall_seconds")
    except (OSError, ValueError):  # a killed cell without a summary: unknown
        return None


# --------------------------------------------------------------------------- executors

def cell_config(cell: Cell, progress: bool) -> RunConfig:
    """The cell's config as it runs (where it is written and whether it shows bars do not change it)."""
    return replace(cell.config, progress=progress)


def run_here(run: SweepRun) -> None:
    """Every pending cell, one at a time, in this process; a cell's own bars show under the sweep's."""
    show = run.plan.base.progress
    with progress_bars(show) as progress:
        run.progress_bar(progress)
        for cell in run.pending():
            run.mark_running(cell)
            resume = run.resume_folder(cell)
            outcome = execute_cell(cell_config(cell, show), run.staging(cell), interrupts=run.interrupts,
                                   resume=resume)
            with run.interrupts.polled():  # the folder moves whole, whatever arrives now
                folder = place_folder(outcome.folder, run.cells_dir, cell.name) if outcome.folder else None
                run.record(cell, outcome, folder)
                shutil.rmtree(run.root.dir / STAGING / cell.name, ignore_errors=True)
            run.interrupts.raise_if_stopped()
            if outcome.status == "interrupted":  # the cell saw the signal first: the sweep stops with it
                raise RunInterrupted(outcome.error or "interrupted", signum=outcome.signum)


Executor = Callable[["SweepRun"], None]  # runs the pending cells of a sweep's folder


def run_sweep(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None, folder: Optional[Path] = None,
              parallel: Optional[Callable[[SweepPlan], Executor]] = None) -> SweepOutcome:
    """Plan ``cfg``'s sweep (every cell validated, nothing written before), then run its pending cells
    in its folder (``folder``, else ``output_dir/sweep-<name>-<key>``); returns the folder and the cells
    that failed. Raises RunInterrupted on SIGINT/SIGTERM, after the folder says so.

    ``parallel``: given the plan, the executor of ``sweep.parallel=true`` (checking the cluster first,
    before the folder exists). The core never imports Ray: the command line passes
    simulations.sweep_ray's; without one, a parallel sweep is refused in one line."""
    plan = plan_sweep(cfg)
    execute: Executor = run_here
    if plan.settings.parallel:
        if parallel is None:
            raise ConfigError("invalid value True for key 'sweep.parallel': no parallel executor here; set "
                              "sweep.parallel=false")
        execute = parallel(plan)
    target = Path(folder) if folder is not None else Path(cfg.output_dir).expanduser() / plan.folder_name
    if target.name.startswith(".") and target.name.endswith(".partial"):
        target = target.with_name(target.name[1:-len(".partial")])
    with SweepRun(plan, target, interrupts if interrupts is not None else Interrupts()) as run:
        execute(run)
    return run.outcome

