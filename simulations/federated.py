"""`mode=federated`: run the server-based comparison on Flower's simulation engine (Ray) and return the
run folder.

All members of `strategies:` share one simulation (one Ray start): the ServerApp runs them one
after another over the same SuperNodes (see server_app.py). With `ray.address` set, the run attaches
to that Ray cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on others)
instead of starting a local one. A comparison of only `centralized-epic` needs no Flower at all.
With `engine: local` the same round engine runs every client in this process, with no Flower messages
and no Ray (fedepic/local_backend.py): the engine for many small rounds on one machine.

Every member checkpoints itself after every `checkpoint_every`-th round; `resume=` continues an
interrupted run in its folder from those checkpoints (fedepic/server_checkpoints.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fedepic.checkpoint import Resume
from fedepic.config import ConfigError, RunConfig
from fedepic.data import load_dataset
from fedepic.extensions import is_reference
from fedepic.interrupts import Interrupts
from fedepic.client_data import checked_poison_set, client_partition, poison_set
from simulations.flower_runtime import check_ray_address, quiet_flower, run_flower


def check_federated(cfg: RunConfig) -> None:
    """Problems that only the federated mode has, as one-line ConfigErrors."""
    if cfg.mode != "federated":
        raise ConfigError(f"invalid value {cfg.mode!r} for key 'mode': run_federated needs mode=federated")
    seen = set()
    for i, name in enumerate(cfg.strategies):
        if name in seen:
            raise ConfigError(f"invalid value {name!r} for key 'strategies[{i}]': listed twice")
        seen.add(name)
    poison_set(cfg)  # gradient_matching needs attack.poisons


def run_federated(cfg: RunConfig, *, client_app: Optional[Any] = None, interrupts: Optional[Interrupts] = None,
                  resume: Optional[Resume] = None) -> Path:
    """Run every strategy of `cfg.strategies` and write the comparison; returns the run folder.

    `client_app` replaces simulations.client_app.app under engine=ray (tests use it to inject a failing client);
    `interrupts` is the caller's SIGINT/SIGTERM handling (the CLI's), else the run installs its own.
    `resume` (from fedepic.checkpoint.resume_config) continues that interrupted run in its folder:
    finished members are kept, the interrupted one continues from its checkpoint.
    """
    quiet_flower()
    check_federated(cfg)
    if client_app is not None and cfg.engine == "local":
        raise ValueError("client_app replaces the Flower ClientApp of engine=ray; engine=local runs no ClientApp")
    check_ray_address(cfg)  # before a run folder exists
    data = load_dataset(cfg.data, cfg.seed)  # a missing dataset fails here, before a run folder exists
    checked_poison_set(cfg, data)  # and so does a poison set that does not fit the data
    try:
        client_partition(cfg, data)  # and a split that does not (data.partition_file's rows)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"invalid value {cfg.data.partition!r} for key 'data.partition': {err}") from None
    from simulations.server_app import make_server_app, open_run, serve

    with open_run(cfg, interrupts=interrupts, resume=resume) as life:  # reads the checkpoints, then opens the folder
        if cfg.engine == "local" or all(is_reference(n) for n in cfg.strategies):
            serve(None, cfg, life, life.interrupts.stop)  # in this process, main thread: a signal raises at once
        else:
            if client_app is None:
                from simulations.client_app import app as client_app
            server_app = make_server_app(cfg, life, life.interrupts.stop)
            run_flower(server_app, client_app, cfg.clients.count, cfg, interrupts=life.interrupts)
            if not life.all_finished:  # the ServerApp stopped early, on a signal (an error would have raised)
                life.interrupts.raise_if_stopped()
    return life.path
