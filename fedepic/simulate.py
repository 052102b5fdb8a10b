"""Command line: `python -m fedepic.simulate config=NAME.yaml [key=value ...]`.

Parses and validates the config, then dispatches on `mode`, or runs the grid of a config with
`sweep` axes (fedepic.sweep). Only this module reaches `simulations/` (and fedepic.sweep, for a
parallel sweep), and only lazily for the federated and decentralized modes, so the centralized path
runs where only torch and torchvision are installed. Bad input exits with status 2 and one line on
stderr; a run that cannot go on (fedepic.errors.RunFailed), or a sweep with failed cells, with 1;
SIGINT and SIGTERM end the run with status "interrupted" and exit 130 and 143 (fedepic.interrupts).
"""

from __future__ import annotations

import os
import sys

# OpenMP threads sleep instead of spinning between parallel regions, unless the environment says
# otherwise: on a machine whose cores other processes share, torch's spinning intra-op threads wait on
# each other at every barrier and an in-process run slows down (docs/results/engines.md, OpenMP's wait policy).
# Set before torch loads its OpenMP runtime (nothing above imports torch); the command's own children
# (Ray's workers, one thread each) inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    from fedepic.sweep.plan import SweepPlan

USAGE = ("usage: python -m fedepic.simulate config=NAME.yaml [key=value ...]   (NAME resolves to configs/NAME.yaml)\n"
         "       python -m fedepic.simulate resume=RUN_FOLDER [config=NAME.yaml key=value ...]   (continue an "
         "interrupted run)\n"
         "       python -m fedepic.simulate config=NAME.yaml sweep.seed=[0,1,2] sweep.KEY=[a,b] ...   (a grid of "
         "runs; the same command again resumes it)")

# a full, read-only or forbidden disk is the user's to fix, not a bug: one line, no traceback


def _split_args(argv: Sequence[str]) -> tuple[Optional[str], Optional[str], list[str]]:
    """(config, resume, overrides) from ``config=``, ``resume=`` (or ``--config=``, ``--resume=``) and the rest."""
    from fedepic.errors import ConfigError

    config, resume, overrides = None, None, []
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key in ("config", "resume") and value:
            if (config if key == "config" else resume) is not None:  # the last one would win silently
                raise ConfigError(f"key '{key}' is given twice on the command line")
            config, resume = (value, resume) if key == "config" else (config, value)
        else:
            overrides.append(arg)
    return config, resume, overrides


def _extension_names() -> str:
    """What each key accepts, from the registries (fedepic/extensions.py)."""
    from fedepic import extensions as ext

    keys = [("strategies (federated)", ext.SERVER_RULES.names() + ext.SERVER_STRATEGIES.names("reference")),
            ("strategies (decentralized)", ext.PEER_RULES.names()), ("attack.model", ext.MODEL_ATTACKS.names()),
            ("attack.data", ext.DATA_ATTACKS.names()), ("defense.compare (centralized)", ext.CENTRAL_DEFENSES.names()),
            ("defense.pre_aggregation", ext.PRE_AGGREGATION.names()), ("data.name", ext.DATASETS.names()),
            ("model.name", ext.MODELS.names()), ("server.protocol", ext.SERVER_PROTOCOLS.names())]
    return "\n".join(f"{key}: {', '.join(names)}" for key, names in keys)


def runner_for(mode: str) -> Callable:
    """The run function of ``mode`` (imported here: the federated and decentralized ones need flwr or ray)."""
    if mode == "centralized":
        from fedepic.centralized import run_centralized

        return run_centralized
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if mode == "federated":
        from simulations.federated import run_federated

        return run_federated
    from simulations.decentralized import run_decentralized

    return run_decentralized


def _ray_executor(plan: "SweepPlan") -> Callable:
    """A parallel sweep's executor (simulations.sweep_ray: Ray tasks), its cluster checked first."""
    from simulations.flower_runtime import check_ray_address
    from simulations.sweep_ray import run_on_ray

    check_ray_address(plan.base)  # one line when ray.address names no cluster, before the folder exists
    return run_on_ray


def _check_cells_cluster(cfg) -> None:
    """A one-at-a-time sweep whose cells attach to ``ray.address`` (federated cells, decentralized ones
    with engine=ray) checks the cluster once, before the sweep's folder exists, rather than each cell
    failing after it; a parallel sweep's executor checks it (`_ray_executor`)."""
    from fedepic.config import sweep_section

    settings, axes = sweep_section(cfg)  # validated with the config; the mode is the same in every cell
    engines = axes.get("engine", [cfg.engine])
    if cfg.ray.address and not settings.parallel and (cfg.mode == "federated" or
                                                     (cfg.mode == "decentralized" and "ray" in engines)):
        from simulations.flower_runtime import check_ray_address

        check_ray_address(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fedepic.config import load_config
    from fedepic.interrupts import Interrupts, cli_outcome  # light: bad input is reported before torch loads

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + _extension_names())
        return 0
    failed_cells: list[str] = []
    try:
        config, resume, overrides = _split_args(argv)
        with Interrupts() as interrupts:
            if resume:
                from fedepic.checkpoint import resume_config

                cfg, point = resume_config(resume, config, overrides)
            else:
                cfg, point = load_config(config, overrides), None
            if cfg.sweep:  # a grid of runs (fedepic/sweep): every cell an ordinary run folder
                from fedepic.sweep.run import run_sweep

                _check_cells_cluster(cfg)
                outcome = run_sweep(cfg, interrupts=interrupts, folder=point.run_dir if point else None,
                                    parallel=_ray_executor)
                run_dir, failed_cells = outcome.folder, outcome.failed
            else:
                run_dir = runner_for(cfg.mode)(cfg, interrupts=interrupts, resume=point)
    except (Exception, KeyboardInterrupt) as err:  # bad input, a failed run, a full disk, a signal
        status = cli_outcome("fedepic", err)
        if status is None:
            raise
        return status
    print(Path(run_dir))
    if failed_cells:  # the sweep went on past them; its summary says "failed" and why, per cell
        print(f"fedepic: sweep finished with {len(failed_cells)} failed cell(s): {', '.join(failed_cells[:5])}"
              f"{' ...' if len(failed_cells) > 5 else ''} (see {Path(run_dir) / 'summary.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
