"""The figures' and report's share of the CPU time of the main command's local run.

    python benchmarks/figure_share.py [--out DIR] [--config noniid.yaml] [key=value ...]
    python benchmarks/figure_share.py --replay DIR      # redraw a run this script recorded in DIR

Runs ``python -m fedepic.simulate config=noniid.yaml engine=local`` once, in this process, with a
CPU clock (``time.process_time``) around each figure and report writer the run calls
(fedepic.lifecycle: ``write_curves`` for each member, ``write_comparison`` for the root's table,
comparison and per-class figures, and fedepic.html_report's ``write_run_report``), and prints one
JSON line: the figures' and report's CPU seconds (and each part's), the whole process's CPU seconds
(``resource.getrusage``, this process and its children: start-up, imports, data, every member, the
figures), the share, the commit, the load average (``uptime``) and the command. Issue 30's target:
a share of at most 15%.

CPU time, not wall time: on a shared machine the wall time of a run depends on the other processes,
while the CPU seconds of the figures and of the run do much less (both clocks count every thread of
this process: the run's torch threads too). Run it several times and take the median.

``--replay DIR``: the run recorded the writers' arguments in ``DIR/figure_calls.pickle``; this
draws them again into a copy of the run folder and prints the figures' CPU seconds (the run's
seconds and share as recorded in ``DIR/figure_share.json``, with the new figures' share of the same
run). A quick measure of a change to the figures, without training again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = "noniid.yaml"
RUN = ["engine=local", "progress=false"]
TARGET_SHARE = 0.15
CALLS = "figure_calls.pickle"
RESULT = "figure_share.json"


@dataclass
class Clock:
    """CPU seconds per part, and the calls seen (their arguments, for ``--replay``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, str, tuple, dict]] = field(default_factory=list)

    def wrap(self, part: str, write: Callable[..., Any]) -> Callable[..., Any]:
        def timed(writer: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((part, _relative(writer), args, kwargs))
            started = time.process_time()
            try:
                return write(writer, *args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.process_time() - started
        return timed


def _relative(writer: Any) -> str:
    """Where ``writer`` writes, relative to the run's root folder ("" for the root)."""
    return "" if getattr(writer, "parent", None) is None else writer.dir.name


def process_cpu() -> float:
    """CPU seconds of this process (every thread) and of its finished children, user and system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """The run's figure and report writers timed by ``clock`` (as fedepic.lifecycle calls them)."""
    from fedepic import html_report, lifecycle

    patched = [(lifecycle, "write_curves", "curves"), (lifecycle, "write_comparison", "comparison"),
               (html_report, "write_run_report", "report_html")]
    originals = [getattr(module, name) for module, name, _ in patched]
    for (module, name, part), original in zip(patched, originals):
        setattr(module, name, clock.wrap(part, original))
    try:
        yield
    finally:
        for (module, name, _), original in zip(patched, originals):
            setattr(module, name, original)


def run(out: Path, overrides: list[str], config: str = CONFIG) -> dict[str, Any]:
    from fedepic import simulate

    clock = Clock()
    load_before = load_average()
    argv = [f"config={config}", *RUN, f"output_dir={out}", *overrides]
    printed = io.StringIO()
    with instrumented(clock), contextlib.redirect_stdout(printed):
        status = simulate.main(argv)
    if status != 0:
        raise SystemExit(f"the run failed with status {status}")
    folder = Path(printed.getvalue().strip().splitlines()[-1])
    run_cpu = process_cpu()
    figures = sum(clock.seconds.values())
    (out / CALLS).write_bytes(pickle.dumps(clock.calls))
    result = {"benchmark": "figure_share", "commit": commit(), "command": "python -m fedepic.simulate " + " ".join(argv),
              "figures_report_cpu_s": round(figures, 2), "parts_cpu_s": {k: round(v, 2) for k, v in clock.seconds.items()},
              "run_cpu_s": round(run_cpu, 2), "share": round(figures / run_cpu, 4), "target_share": TARGET_SHARE,
              "load_average_before": load_before, "load_average_after": load_average(), "folder": str(folder)}
    (out / RESULT).write_text(json.dumps(result))
    return result


@dataclass
class ReplayFolder:
    """A copy of a run folder the writers draw into again (what they use of fedepic.outputs.RunWriter)."""

    dir: Path
    parent: Any = None

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def write_bytes(self, name: str, data: bytes) -> None:
        (self.dir / name).write_bytes(data)


def replay(out: Path, repeats: int) -> dict[str, Any]:
    from fedepic import html_report, report

    recorded = json.loads((out / RESULT).read_text())
    calls = pickle.loads((out / CALLS).read_bytes())
    writers = {"curves": report.write_curves, "comparison": report.write_comparison,
               "report_html": html_report.write_run_report}
    totals: list[float] = []
    parts: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(recorded["folder"], copy)
        for _ in range(repeats):
            seconds: dict[str, float] = {}
            for part, where, args, kwargs in calls:
                root = ReplayFolder(copy)
                writer = root if not where else ReplayFolder(copy / where, root)
                started = time.process_time()
                writers[part](writer, *args, **kwargs)
                seconds[part] = seconds.get(part, 0.0) + time.process_time() - started
            totals.append(sum(seconds.values()))
            for k, v in seconds.items():
                parts.setdefault(k, []).append(v)
    figures = statistics.median(totals)
    # the run's CPU with the recorded figures swapped for these
    run_cpu = recorded["run_cpu_s"] - recorded["figures_report_cpu_s"] + figures
    return {"benchmark": "figure_share --replay", "commit": commit(), "recorded": recorded["commit"],
            "repeats": repeats, "figures_report_cpu_s": round(figures, 2), "all_cpu_s": [round(t, 2) for t in totals],
            "parts_cpu_s": {k: round(statistics.median(v), 2) for k, v in parts.items()},
            "run_cpu_s": round(run_cpu, 2), "share": round(figures / run_cpu, 4), "target_share": TARGET_SHARE,
            "load_average": load_average(), "command": "python benchmarks/figure_share.py --replay " + str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where the run folder goes (default: a new temporary folder)")
    parser.add_argument("--config", default=CONFIG, help="the run's config (default: the main command's)")
    parser.add_argument("--replay", type=Path, help="draw again the figures of a run this script recorded here")
    parser.add_argument("--repeats", type=int, default=3, help="--replay: how many times (the median is printed)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.replay is not None:
        print(json.dumps(replay(args.replay, args.repeats)))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="figure_share-"))
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(out, args.overrides, args.config)))


if __name__ == "__main__":
    main()
