"""One run folder from its start to every end, in every mode: members, their sub-folders, the root
summary, the comparison.

A run (:class:`RunLifecycle`, a context manager) owns the root folder (fedepic.outputs.RunWriter),
fresh or, with ``resume``, the interrupted run's folder reopened. The runner opens each member's
sub-folder when the member starts (members that never start get none) and completes it when the
member finishes; a resumed run instead keeps the members the interrupted run completed. Leaving the
context, on every exit path and inside ``Interrupts.polled`` (a signal cannot cut it short):

- the members still open are closed with the status the exit gives (``RunWriter.mark``:
  "interrupted" for SIGINT/SIGTERM, else "failed") and the ``error`` that ended them;
- the root gets the comparison of the finished members, in member order (fedepic.report: table and
  figures), and its summary.json: the status, ``mode``, ``finished``, ``rows`` (the finished members'
  comparison rows), ``comparison`` (the table's ``columns``, the first naming the member; the curves'
  ``panels`` and ``xlabel``, for readers such as a sweep's aggregation), ``resumed`` and the mode's own
  figures (``extras``);
- then report.html (fedepic.html_report), from what the folder holds by then;
- a completed run deletes its checkpoints (fedepic.checkpoint.remove_checkpoints).

A member's summary.json holds what its report says (:class:`MemberReport`, asked for when the member
ends, so a member cut short reports what it did), and its figures its curves (none with
``figures.enabled=false``). Every member keeps one line style (fedepic.plots.member_styles over
``members``) in every figure of the run. A figure or report that cannot be written is a warning line
on stderr: the folder is still renamed into place and the statuses stay what the run's end made them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fedepic.checkpoint import CHECKPOINT, Resume, remove_checkpoints, truncate_metrics
from fedepic.config import RunConfig, to_yaml
from fedepic.interrupts import Interrupts
from fedepic.outputs import LOCK, RunWriter
from fedepic.report import Curves, best_effort, write_comparison, write_curves


@dataclass
class Comparison:
    """How the root compares its members: the table's columns, the plot's panels, title (the setting:
    fedepic.report.setting_title), x axis (the key of the x values in metrics.jsonl too: "round",
    "epoch") and, optionally, what the figures call each class (e.g. "7 (exclusive)")."""

    columns: Sequence[str]
    panels: Sequence[str]
    title: str
    xlabel: str = "round"
    class_labels: Optional[Sequence[str]] = None


@dataclass
class MemberReport:
    """What a member has to show now: its summary.json figures, its comparison row and its curves."""

    summary: dict[str, Any]
    row: dict[str, Any]
    curves: Curves = field(default_factory=dict)


class FolderLifecycle:
    """A folder (``self.root``, a RunWriter) that ends with a true summary on every exit path, under the
    caller's SIGINT/SIGTERM handling (``self.interrupts``); a context manager.

    Entering enters the interrupts, then the folder, then calls :meth:`start`; leaving, on every path,
    calls :meth:`finish` with the exception (or None) inside ``Interrupts.polled`` (a signal cannot cut
    it short), then closes the folder (renamed into place, even if ``finish`` failed), then leaves the
    interrupts. A failing :meth:`start` leaves a reopened folder the same way, and removes a new one
    (RunWriter.discard: nothing was written yet).
    """

    interrupts: Interrupts
    root: RunWriter

    def start(self) -> None:
        """What the folder needs first (its config), once it is open."""

    def finish(self, exc: Optional[BaseException]) -> None:
        """The statuses and summaries of an end caused by ``exc`` (None: the work returned)."""

    def __enter__(self):
        self.interrupts.__enter__()
        try:
            self.root.__enter__()
        except BaseException:
            self.interrupts.__exit__(None, None, None)
            raise
        try:
            self.start()
        except BaseException as err:
            if self.root.resuming:
                self.__exit__(type(err), err, err.__traceback__)
            else:  # a new run that could not write its config (a full disk) leaves nothing behind
                try:
                    self.root.discard()
                finally:
                    self.interrupts.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with self.interrupts.polled():  # a signal now must not cut the summaries short
                try:
                    self.finish(exc)
                finally:  # the folder is renamed into place even if a report could not be written
                    self.root.__exit__(exc_type, exc, tb)
        finally:
            self.interrupts.__exit__(exc_type, exc, tb)


class RunLifecycle(FolderLifecycle):
    """The run folder of ``cfg`` and its ``members`` (in comparison order); see the module docstring.

    Parameters
    ----------
    comparison : Comparison
        The root's comparison of the finished members.
    interrupts : Interrupts, optional
        The caller's SIGINT/SIGTERM handling (the CLI's); the run enters its own when None.
    resume : Resume, optional
        An interrupted run to continue in its folder (fedepic.checkpoint.resume_config).
    extras : callable, optional
        The mode's root summary figures, given the finished rows; called when the run ends (the
        attribute of that name may be replaced until then).
    """

    def __init__(self, cfg: RunConfig, members: Sequence[str], comparison: Comparison, *,
                 interrupts: Optional[Interrupts] = None, resume: Optional[Resume] = None,
                 extras: Optional[Callable[[list[dict]], Mapping[str, Any]]] = None) -> None:
        self.cfg, self.members, self.comparison, self.resume = cfg, list(members), comparison, resume
        self.interrupts = interrupts if interrupts is not None else Interrupts()
        self.extras = extras or (lambda rows: {})
        # read before the folder is touched (it is renamed to .partial): an unreadable checkpoint is a
        # one-line ConfigError with nothing written
        self._saved = {m: resume.member_checkpoint(m) for m in self.members if not resume.finished(m)} \
            if resume is not None else {}
        self._kept = {m for m in self.members if resume is not None and resume.finished(m)}
        self.root = RunWriter(cfg.output_dir, cfg.name, resume=resume.run_dir if resume is not None else None,
                              tensorboard=cfg.log.tensorboard)
        self.writers: dict[str, RunWriter] = {}  # the members open now
        self._reports: dict[str, Callable[[], MemberReport]] = {}
        self._done: dict[str, tuple[dict, Curves]] = {}  # finished member -> its row and curves
        self._ended = False

    # ------------------------------------------------------------------ the root

    def start(self) -> None:
        self.root.write_config(to_yaml(self.cfg))

    @property
    def path(self) -> Path:
        """Where the run folder is once the run ends."""
        return self.root.path

    @property
    def finished(self) -> list[str]:
        """The members completed (in this run or kept from the interrupted one), in member order."""
        return [m for m in self.members if m in self._done]

    @property
    def rows(self) -> list[dict]:
        """The finished members' comparison rows, in member order."""
        return [self._done[m][0] for m in self.finished]

    @property
    def all_finished(self) -> bool:
        """Every member finished: only then may the run end "completed"."""
        return len(self._done) == len(self.members)

    def start_over(self) -> None:
        """Empty the reopened folder of a resumed run that has nothing to continue from (the config stays)."""
        for child in self.root.dir.iterdir():
            if child.name not in ("config.yaml", "metrics.jsonl", LOCK):  # the root's own files, reopened
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        truncate_metrics(self.root.dir, 0)
        self._saved, self._kept = {}, set()

    # ------------------------------------------------------------------ members

    def kept(self, name: str) -> bool:
        """True for a member the interrupted run completed: its folder stays as it is (see :meth:`keep`)."""
        return name in self._kept

    def kept_summary(self, name: str) -> dict[str, Any]:
        """The summary.json of a kept member."""
        assert self.resume is not None and self.kept(name)
        return self.resume.members[name]

    def checkpoint(self, name: str) -> Optional[dict[str, Any]]:
        """The checkpoint in member ``name``'s folder that a resumed run continues from, or None."""
        return self._saved.get(name)

    def keep(self, name: str, row: dict, curves: Curves) -> None:
        """A kept member is finished: the comparison covers it with ``row`` and ``curves``."""
        self._done[name] = (row, curves)

    def open_member(self, name: str, report: Callable[[], MemberReport],
                    continue_at: Optional[int] = None) -> RunWriter:
        """Open member ``name``'s sub-folder; ``report`` says what the member has done when it ends.

        ``continue_at``: the member continues from a checkpoint, its metrics.jsonl cut back to this many
        bytes (the lines after it are logged again); None: it starts over, and a folder the interrupted
        run left for it is cleared.
        """
        assert name not in self.writers and name not in self._done, name
        folder = self.root.dir / name
        if continue_at is not None:
            truncate_metrics(folder, continue_at)
        elif folder.exists():
            shutil.rmtree(folder)
        writer = RunWriter(self.root.dir, name, parent=self.root).__enter__()
        self.writers[name], self._reports[name] = writer, report
        return writer

    def complete(self, name: str) -> None:
        """Member ``name`` finished: its summary ("completed") and curves; its checkpoint goes."""
        self._close_member(name, None)

    def _close_member(self, name: str, exc: Optional[BaseException]) -> None:
        writer, make_report = self.writers.pop(name), self._reports.pop(name)
        writer.mark(exc)
        try:  # a report that fails still leaves the member closed, with its status (RunWriter.close)
            report = make_report()
            summary = report.summary if exc is None else {**report.summary, "error": str(exc) or type(exc).__name__}
            c = self.comparison
            write_curves(writer, report.curves, c.xlabel, f"{name} \N{EM DASH} {c.title}", line=self._styles()[name],
                         figures=self.cfg.figures)
            writer.write_summary(summary)
        finally:
            writer.close()
        if exc is None:
            (writer.dir / CHECKPOINT).unlink(missing_ok=True)  # its results are final; a resume keeps it
            self._done[name] = (report.row, report.curves)

    # ------------------------------------------------------------------ the end

    def _styles(self) -> dict:
        from fedepic.plots import member_styles  # matplotlib: imported when a figure is drawn

        return member_styles(self.members)

    def _write_html(self) -> None:
        from fedepic.html_report import write_run_report

        write_run_report(self.root, members=self.members, title=self.comparison.title)

    def finish(self, exc: Optional[BaseException]) -> None:
        """Close the members cut short by ``exc``, write the comparison and the root summary, and delete
        the checkpoints of a completed run. Runs once (on leaving the context, at the latest)."""
        if self._ended:
            return
        self._ended = True
        with self.interrupts.polled():
            if exc is None and not self.all_finished:  # not "completed": a member did not run to its end
                exc = RuntimeError(f"the run ended before {', '.join(m for m in self.members if m not in self._done)} "
                                   "finished")
            self.root.mark(exc)
            broken: Optional[Exception] = None  # a member whose report failed: the others still close
            for name in list(self.writers):
                try:
                    self._close_member(name, exc)
                except Exception as err:  # noqa: BLE001 - re-raised below, after the root summary
                    broken = broken or err
            if broken is not None and exc is None:
                self.root.mark(broken)
            rows = self.rows
            if rows:
                c = self.comparison
                write_comparison(self.root, rows, c.columns, {m: self._done[m][1] for m in self.finished}, c.panels,
                                 c.title, c.xlabel, styles=self._styles(), figures=self.cfg.figures,
                                 class_labels=c.class_labels)
            c = self.comparison  # what the rows and curves hold, for readers such as a sweep's aggregation
            self.root.write_summary({"mode": self.cfg.mode, "finished": self.finished, "rows": rows,
                                     "comparison": {"columns": list(c.columns), "panels": list(c.panels),
                                                    "xlabel": c.xlabel},
                                     "resumed": self.resume is not None, **self.extras(rows)})
            best_effort("report.html", self._write_html)
            if self.root.status == "running":
                remove_checkpoints(self.root.dir)
        if broken is not None and exc is None:
            raise broken
