"""The reproduction table of a replay (``fedepic.reproduce.compare``) as text and files.

``markdown`` gives ``reproduction.md``: a header (replay, paper, sweep folder, seeds, tolerance rule,
what differs from the published protocol, any command-line overrides), then one row per published
cell (published figure, its seeds and std, fedepic's mean and std over its seeds, the difference, the
tolerance, the verdict), then one line per cell that has no verdict, saying why. ``payload`` gives
``reproduction.json``, the same content as data. ``write_into_sweep`` writes them into the sweep folder
under its lock, with no link in it, each beside its final name and renamed, so a reader never sees half
a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fedepic.reproduce.compare import CellResult
from fedepic.reproduce.replays import Replay

VERDICTS = ("within", "outside", "missing", "not comparable")


def _number(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _key(key: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items())


def _seeds(seeds: Sequence[Any]) -> str:
    return ",".join(str(s) for s in seeds) if seeds else "-"


def counts(results: Sequence[CellResult]) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in results) for v in VERDICTS}


def table_rows(results: Sequence[CellResult]) -> list[str]:
    """The Markdown table: one row per published cell."""
    lines = ["| cell | published | its seeds | its std | fedepic mean | fedepic std | fedepic seeds | difference "
             "| tolerance | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {_key(r.key)} | {r.published:.2f} | {_seeds(r.published_seeds)} | {_number(r.published_std)} "
                     f"| {_number(r.mean)} | {_number(r.std)} | {_seeds(r.seeds)} | {_number(r.difference)} "
                     f"| {r.tolerance:.2f} | {r.verdict} |")
    return lines


def markdown(replay: Replay, paper: str, folder: Path, results: Sequence[CellResult], seeds: Sequence[int],
             overrides: Sequence[str], subset: Sequence[str] = ()) -> str:
    n = counts(results)
    lines = [f"# Reproduction: {replay.name}", "", f"- replay: {replay.about}", f"- published: {paper}",
             f"- fedepic: config `configs/{replay.config}`, sweep folder `{folder}`, seeds {_seeds(seeds)}",
             f"- tolerance: a cell is reproduced when fedepic's mean over its seeds lies within the published "
             f"seed std + {replay.points:g} points of the published figure ({replay.single_seed_points:g} points "
             "where it has one seed); figures in percent"]
    if subset:
        lines.append(f"- part of the replay: {' '.join(subset)} (the shipped protocol; the cells left out say "
                     "missing)")
    if overrides:
        lines.append(f"- **protocol changed: {' '.join(overrides)}: a verdict here says nothing about the "
                     "published experiment**")
    if replay.comparable:
        lines.append(f"- **not a reproduction: {replay.comparable}**")
    # with overrides these are the shipped protocol's differences: an override may have removed one
    where = " (the shipped config's, before the overrides above)" if overrides else ""
    lines += [f"- differs from the published protocol{where}: {d}" for d in replay.deviations]
    lines += ["", f"Cells: {len(results)}; " + ", ".join(f"{v} {c}" for v, c in n.items() if c), "",
              *table_rows(results)]
    notes = [r for r in results if r.reason]
    if notes:
        lines += ["", "## Notes per cell", ""]
        lines += [f"- {_key(r.key)} ({r.verdict}): {r.reason}" for r in notes]
    return "\n".join(lines) + "\n"


def payload(replay: Replay, paper: str, folder: Path, results: Sequence[CellResult], seeds: Sequence[int],
            overrides: Sequence[str], subset: Sequence[str] = ()) -> dict[str, Any]:
    return {"replay": replay.name, "about": replay.about, "paper": paper, "experiment": replay.experiment,
            "config": f"configs/{replay.config}", "sweep_folder": str(folder), "seeds": list(seeds),
            "overrides": list(overrides), "protocol_changed": bool(overrides), "subset": list(subset),
            "tolerance": {"points": replay.points, "single_seed_points": replay.single_seed_points,
                          "spread": "published sample std (ddof 1)"},
            "comparable": replay.comparable is None, "not_comparable_because": replay.comparable,
            "deviations": list(replay.deviations), "counts": counts(results),
            "cells": [r.record() for r in results]}


def write_into_sweep(folder: Path, files: Mapping[str, str], key: str = "--from") -> None:
    """Each of ``files`` (name -> text) into the sweep folder ``folder`` as a run writes its files: under
    the folder's lock (``fedepic.outputs.lock_folder``: a sweep still running there is refused in one
    line naming ``key``), after checking that no symbolic link is in it (``refuse_links``, as ``resume=`` checks), each
    written to a fresh temporary file beside it and renamed over the name (``atomic_write_text``: a link
    planted at the name is replaced, never written through)."""
    from fedepic.outputs import atomic_write_text, lock_folder, refuse_links, unlock_folder

    lock = lock_folder(folder, key, "sweep")
    try:
        refuse_links(folder, key)
        for name, text in files.items():
            atomic_write_text(folder / name, text)
    finally:
        unlock_folder(folder, lock)
