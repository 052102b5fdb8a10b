"""Command line: ``python -m fedepic.reproduce NAME [--seeds K] [--dry-run] [--from RUN_FOLDER] [key=value ...]``.

Replays a published experiment (fedepic issue 33): runs the sweep of the replay's shipped config
(``fedepic.reproduce.replays``) with the authors' seeds (or seeds 0 .. K-1), or reads a finished sweep
folder given with ``--from``, then prints and writes into that folder ``reproduction.md`` and
``reproduction.json``: per published cell the published figure with its seeds and spread, fedepic's
mean and spread over its seeds, the tolerance and whether the cell is within it, and for every cell
fedepic cannot run yet what it lacks (``fedepic.reproduce.compare``). ``--dry-run`` prints the plan
and runs nothing; ``--list`` lists the replays. ``key=value`` overrides go to the config as in
``python -m fedepic.simulate``: one that keeps part of the replay's members (``strategies=[...]``) or of
one unzipped sweep axis's values runs part of the replay under its protocol (``fedepic.reproduce.subset``;
the cells left out say missing); any other marks the table as a changed protocol. Bad input (an unknown NAME,
flag or key, a bad value, a folder that is not the replay's sweep) prints one line and exits 2 with
nothing written; a sweep with failed cells exits 1 after writing the table.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as fedepic.simulate, before torch loads
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

USAGE = ("usage: python -m fedepic.reproduce NAME [--seeds K] [--dry-run] [key=value ...]\n"
         "       python -m fedepic.reproduce NAME --from SWEEP_FOLDER   (compare a finished run folder)\n"
         "       python -m fedepic.reproduce --list")


@dataclass
class Arguments:
    name: Optional[str] = None
    seeds: Optional[int] = None
    dry_run: bool = False
    listing: bool = False
    help: bool = False
    source: Optional[str] = None
    overrides: list[str] = field(default_factory=list)


def parse(argv: Sequence[str]) -> Arguments:
    """The command's arguments; anything unknown is a ConfigError naming it."""
    from fedepic.errors import ConfigError

    args, items = Arguments(), list(argv)
    while items:
        item = items.pop(0)
        flag, eq, inline = item.partition("=")
        if item in ("-h", "--help"):
            args.help = True
        elif item == "--list":
            args.listing = True
        elif item == "--dry-run":
            args.dry_run = True
        elif flag in ("--seeds", "--from"):
            if not eq and not items:
                raise ConfigError(f"invalid value None for {flag}: give a value ({flag} VALUE)")
            value = inline if eq else items.pop(0)
            if flag == "--from":
                args.source = value
            else:
                args.seeds = _count(value)
        elif item.startswith("-"):
            raise ConfigError(f"invalid value {item!r} for the command: unknown flag (--seeds, --dry-run, --from, --list)")
        elif eq:
            args.overrides.append(item)
        elif args.name is None:
            args.name = item
        else:
            raise ConfigError(f"invalid value {item!r} for the replay NAME: one NAME only (already {args.name!r})")
    return args


def _count(value: str) -> int:
    from fedepic.errors import ConfigError

    if not value.isdigit() or int(value) < 1 or int(value) > 1000:
        raise ConfigError(f"invalid value {value!r} for --seeds: a whole number of seeds from 1 to 1000")
    return int(value)


def listing() -> str:
    from fedepic.reproduce.published import cells
    from fedepic.reproduce.replays import REPLAYS

    lines = ["| replay | published cells | seeds | config | what |", "|---|---|---|---|---|"]
    for r in REPLAYS.values():
        lines.append(f"| {r.name} | {len(cells(r.experiment))} | {','.join(map(str, r.seeds))} | configs/{r.config} "
                     f"| {r.about}{' (not a reproduction: CPU smoke)' if r.comparable else ''} |")
    return "\n".join(lines)


def _paper(experiment: str) -> str:
    from fedepic.reproduce.published import PUBLISHED, _read

    return str(_read(PUBLISHED)["experiments"][experiment].get("paper", experiment))


def run_overrides(replay, args: Arguments, seeds: Sequence[int]) -> list[str]:
    """The overrides the sweep runs with: the replay's paths, the user's, and the seed axis."""
    from fedepic.errors import ConfigError

    for item in args.overrides:
        if item.split("=", 1)[0].lstrip("-") in ("sweep.seed", "seed", "config", "resume"):
            raise ConfigError(f"invalid value {item!r} for the command: set the seeds with --seeds K, the config "
                              "is the replay's")
    return [*replay.fixed_overrides(), *args.overrides, f"sweep.seed=[{','.join(map(str, seeds))}]"]


def plan_text(replay, plan, cells, overrides: Sequence[str], seeds: Sequence[int]) -> str:
    """What a run would do: the command, the sweep's cells, and where each published cell comes from."""
    from fedepic.reproduce.compare import SweepCell, matches
    from fedepic.sweep.plan import label

    folder = Path(plan.base.output_dir).expanduser() / plan.folder_name
    lines = [f"replay {replay.name}: {replay.about}", f"published: {_paper(replay.experiment)}",
             f"seeds: {','.join(map(str, seeds))}",
             f"command: python -m fedepic.simulate config={replay.config_path()} {' '.join(overrides)}",
             f"sweep folder: {folder}", f"sweep cells ({len(plan.cells)}):"]
    lines += [f"  {c.name}: {c.describe()}" for c in plan.cells]
    lines.append(f"published cells ({len(cells)}):")
    for cell in cells:
        mapping = replay.map_cell(cell.key)
        runs = [c.name for c in plan.cells if matches(SweepCell(c.values, "pending", None), mapping.values)]
        where = ", ".join(f"{k}={label(v)}" for k, v in mapping.values.items()) or "every cell"
        status = f"MISSING: needs {mapping.needs}" if mapping.needs else f"from {len(runs)} sweep cell(s)"
        lines.append(f"  {', '.join(f'{k}={v}' for k, v in cell.key.items())}: published {cell.value:.2f}, "
                     f"tolerance {cell.tolerance(replay.points, replay.single_seed_points):.2f}; fedepic {mapping.member} "
                     f"{mapping.metric} at {where}: {status}")
    if replay.comparable:
        lines.append(f"not a reproduction: {replay.comparable}")
    return "\n".join(lines)


def run(replay, args: Arguments, seeds: Sequence[int], interrupts) -> tuple[Path, list[str]]:
    """Run (or resume) the replay's sweep; returns its folder and the failed cells."""
    from fedepic.config import load_config
    from fedepic.simulate import _check_cells_cluster, _ray_executor
    from fedepic.sweep.run import run_sweep

    cfg = load_config(str(replay.config_path()), run_overrides(replay, args, seeds))
    _check_cells_cluster(cfg)
    outcome = run_sweep(cfg, interrupts=interrupts, parallel=_ray_executor)
    return Path(outcome.folder), outcome.failed


def check_source(replay, folder: Path, summary: dict) -> None:
    """--from must name a sweep of the replay's config."""
    import yaml

    from fedepic.errors import ConfigError

    name = (yaml.safe_load(replay.config_path().read_text(encoding="utf-8")) or {}).get("name")
    if summary.get("name") != name:
        raise ConfigError(f"invalid value '{folder}' for --from: a sweep of {summary.get('name')!r}, not of replay "
                          f"{replay.name!r} (config name {name!r})")


def changed_protocol(replay, folder: Path, summary: dict, seeds: Sequence[int]) -> tuple[list[str], list[str]]:
    """For --from: (subset, changed). Nothing changed when the folder is the shipped config's sweep with
    these seeds (the same sweep key), possibly narrowed to part of its members or axis values
    (``fedepic.reproduce.subset``); else one line saying the folder's config differs."""
    import yaml

    from fedepic.config import load_config
    from fedepic.reproduce.subset import folder_subset
    from fedepic.sweep.plan import plan_sweep

    def key(extra: Sequence[str]) -> str:
        return plan_sweep(load_config(str(replay.config_path()), [*replay.fixed_overrides(), *extra,
                                                                  f"sweep.seed=[{','.join(map(str, seeds))}]"])).key

    shipped = key([])
    if summary.get("key") == shipped:
        return [], []
    try:
        strategies = (yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}).get("strategies", [])
    except (OSError, yaml.YAMLError):
        strategies = []
    subset = folder_subset(str(replay.config_path()), replay.fixed_overrides(), strategies or [],
                           summary.get("axes") or {})
    if subset and summary.get("key") == key(subset):
        return subset, []
    return [], [f"(the folder's sweep key {summary.get('key')} is not the shipped config's {shipped}: it ran with "
                "other settings; see its config.yaml)"]


def failed_cells(summary: dict) -> list[str]:
    """The names of the cells a sweep folder's summary lists as failed (what a run of the sweep reports)."""
    return [str(c.get("name", c.get("index"))) for c in summary.get("cells", [])
            if isinstance(c, dict) and c.get("status") == "failed"]


def report(replay, folder: Path, sweep, seeds: Sequence[int], overrides: Sequence[str], key: str = "--from",
           subset: Sequence[str] = ()) -> str:
    """Compare, write reproduction.md and reproduction.json into ``folder`` (``output.write_into_sweep``;
    ``key`` names the folder's source in a refusal); returns the Markdown."""
    import json

    from fedepic.reproduce import output
    from fedepic.reproduce.compare import compare
    from fedepic.reproduce.published import cells

    results = compare(replay, cells(replay.experiment), sweep)
    paper = _paper(replay.experiment)
    text = output.markdown(replay, paper, folder, results, seeds, overrides, subset)
    data = output.payload(replay, paper, folder, results, seeds, overrides, subset)
    output.write_into_sweep(folder, {"reproduction.json": json.dumps(data, indent=1) + "\n",
                                     "reproduction.md": text}, key)
    return text


def execute(args: Arguments, interrupts) -> int:
    from fedepic.config import load_config
    from fedepic.errors import ConfigError
    from fedepic.reproduce.compare import read_sweep
    from fedepic.reproduce.published import cells
    from fedepic.reproduce.replays import get
    from fedepic.reproduce.subset import split_overrides

    if args.name is None:
        raise ConfigError("invalid value None for the replay NAME: give one (python -m fedepic.reproduce --list)")
    replay = get(args.name)
    seeds = tuple(range(args.seeds)) if args.seeds else replay.seeds
    failed: list[str] = []
    if args.source is not None:
        if args.overrides or args.seeds or args.dry_run:
            raise ConfigError(f"invalid value {args.source!r} for --from: it reads a finished folder as it is; give "
                              "no key=value, --seeds or --dry-run with it")
        folder = Path(args.source)
        summary, sweep = read_sweep(folder)
        check_source(replay, folder, summary)
        seeds = tuple(sorted({c.seed for c in sweep if c.seed is not None}))
        subset, changed = changed_protocol(replay, folder, summary, seeds)
        failed = failed_cells(summary)
    elif args.dry_run:
        from fedepic.sweep.plan import plan_sweep

        overrides = run_overrides(replay, args, seeds)
        plan = plan_sweep(load_config(str(replay.config_path()), overrides))
        print(plan_text(replay, plan, cells(replay.experiment), overrides, seeds))
        return 0
    else:
        folder, failed = run(replay, args, seeds, interrupts)
        summary, sweep = read_sweep(folder)
        subset, changed = split_overrides(str(replay.config_path()), replay.fixed_overrides(), args.overrides)
    print(report(replay, folder, sweep, seeds, changed, "--from" if args.source is not None else "output_dir", subset),
          end="")
    print(folder / "reproduction.md")
    if failed:
        print(f"fedepic.reproduce: {len(failed)} sweep cell(s) failed: {', '.join(failed[:5])} (see "
              f"{folder / 'summary.json'})", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fedepic.interrupts import Interrupts, cli_outcome

    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(USAGE)
            return 0
        if args.listing:
            print(listing())
            return 0
        with Interrupts() as interrupts:
            return execute(args, interrupts)
    except (Exception, KeyboardInterrupt) as err:  # bad input, a failed run, a full disk, a signal
        status = cli_outcome("fedepic.reproduce", err)
        if status is None:
            raise
        return status

if __name__ == "__main__":
    sys.exit(main())
