"""Plumbing shared by the Flower simulations (server-based and decentralized): quiet logs, the Ray
backend config, a Ctrl-C safe `run_simulation`, stop-aware message exchange and each client's
(possibly attacked) data. The comparison table and plot are in fedepic/report.py.

Ray and the node registration race:
- a local cluster is started with ``address="local"``: without it ``ray.init()`` attaches to any
  cluster found in /tmp/ray/ray_current_cluster (a `ray start --head` someone else runs);
- every Ray process the run starts is gone when `run_flower` returns or raises: Flower's backend
  calls ``ray.shutdown()``, and `run_flower` calls it again on every exit path. An attached external
  cluster is only disconnected from (its nodes keep running; this job's actors end with the driver).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from fedepic.attacks import poison_rows
from fedepic.config import ConfigError, RunConfig, malicious_ids, validate
from fedepic.data import ImageData, cache_dir, default_root, load_dataset
from fedepic.errors import RunFailed, RunInterrupted
from fedepic.interrupts import Interrupts
from fedepic.partition import label_histograms, partition

ENV_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                # Ray's core worker otherwise installs absl's failure signal handler in the driver at
                # ray.init, over ours: SIGTERM then aborted the run (rc 134) instead of stopping it.
                "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}
PULL_INTERVAL_S = 0.01  # Flower's own send_and_receive polls every 0.1 s; replies arrive sooner


# --------------------------------------------------------------------------- logs and Ray


class _DropKnownNoise(logging.Filter):
    """Warnings we cause on purpose: `run_simulation` is deprecated in favour of `flwr run` (both work,
    see the README), and the ServerApp evaluates centrally, so client-side evaluation is off."""

    NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.NOISE)


def quiet_flower(level: int = logging.WARNING) -> None:
    """Telemetry off (no network here), Ray's accelerator env override off, and quieter loggers."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(level)
    if not any(isinstance(f, _DropKnownNoise) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropKnownNoise())
    logging.getLogger("ray").setLevel(max(level, logging.WARNING))


def backend_config(cfg: RunConfig) -> dict:
    """`backend_config` for `flwr.simulation.run_simulation`; `init_args` go straight to `ray.init`."""
    init_args: dict[str, Any] = {"log_to_driver": False}
    if cfg.ray.address:
        init_args["address"] = cfg.ray.address  # the cluster decides its size: no num_cpus here
    else:
        init_args["address"] = "local"  # never attach to a cluster that happens to run on this host
        # No dashboard for a run-scoped local cluster: its processes cost CPU at every start (measured
        # below in benchmarks/RESULTS.md) and nobody watches them; an attached cluster keeps its own.
        init_args["include_dashboard"] = False
        if cfg.ray.num_cpus is not None:
            init_args["num_cpus"] = int(cfg.ray.num_cpus)
    return {
        # Flower passes client_resources to `ClientAppActor.options(...)`. Without max_restarts a
        # worker process that dies (segfault, OOM kill, os._exit) leaves a dead actor in Flower's pool
        # and every later message it is given fails too; with it, Ray restarts the process. One task
        # retry lets a message that was queued on the dying actor run on the restarted one (and gives
        # a transient crash, such as a preempted cluster node, a second chance); only a client that
        # dies again fails, and is recorded as that round's failure while the round goes on.
        "client_resources": {"num_cpus": float(cfg.ray.client_cpus), "num_gpus": float(cfg.ray.client_gpus),
                             "max_restarts": -1, "max_task_retries": 1},
        "init_args": init_args,
    }


@contextmanager
def _ray_leaves_sigterm_alone() -> Iterator[None]:
    """While inside, `ray.init` keeps the driver's SIGTERM handler (ours, fedepic.interrupts).

    ray.init replaces it with ``sys.exit(signum)`` (ray/_private/worker.py, through
    ``ray._private.utils.set_sigterm_handler``), and has no option to skip that. The SystemExit then
    ends Flower's simulation loop while the ServerApp thread still waits for replies, so the run hung
    (and its status was never written). Ray's worker processes, where the same helper matters, are
    other processes and keep it. tests/test_interrupts.py fails if a Ray release moves this.
    """
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


RAY_CONNECT_TIMEOUT_S = 10.0


def check_ray_address(cfg: RunConfig, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A ConfigError naming ``ray.address`` unless its GCS port accepts a TCP connection within
    ``timeout_s``: `ray.init` keeps retrying an unreachable cluster for minutes, and then hangs in
    shutdown. "auto" reads the address of the cluster started on this machine (`ray start`)."""
    address = cfg.ray.address
    if not address:
        return
    target = address.removeprefix("ray://")
    if target == "auto" and os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"].removeprefix("ray://")  # what ray.init("auto") reads first
    if target == "auto":
        from ray._common.utils import get_ray_address_file  # where `ray start` records the cluster

        current = Path(get_ray_address_file(None))
        if not current.is_file():
            raise ConfigError(f"invalid value 'auto' for key 'ray.address': no Ray cluster runs on this machine "
                              f"({current} not found; start one with `ray start --head`)")
        target = current.read_text().strip()
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise ConfigError(f"invalid value {address!r} for key 'ray.address': expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"invalid value {address!r} for key 'ray.address': no Ray cluster answers at "
                          f"{host}:{port} within {timeout_s:.0f} s ({err.strerror or err})") from None


def run_flower(server_app: Any, client_app: Any, num_nodes: int, cfg: RunConfig, *,
               interrupts: Optional[Interrupts] = None) -> None:
    """`run_simulation` with one SuperNode per client on Ray; every Ray process it started is gone on exit.

    The ServerApp polls ``interrupts.stop`` (via `exchange`): SIGINT or SIGTERM sets it, the ServerApp
    writes its statuses and ends, and Flower stops its workers and Ray; later signals are ignored
    while that happens (fedepic.interrupts). The call then returns: whether the run was cut short
    (and so raises RunInterrupted) is the caller's to say, since a signal may also arrive after the
    ServerApp finished its work.
    """
    import ray
    from flwr.simulation import run_simulation

    quiet_flower()
    interrupts = interrupts if interrupts is not None else Interrupts()
    if ray.is_initialized():
        ray.shutdown()  # a stale connection would make Flower reuse it instead of the configured cluster
    # Ray's driver prints cluster messages ("(raylet) Task ... will be retried", a worker died) on
    # stdout; they go to stderr here, so that stdout keeps only what the caller prints (the CLI's run
    # folder, a benchmark's JSON line).
    with redirect_stdout(sys.stderr), interrupts, interrupts.polled(), _ray_leaves_sigterm_alone():
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                           backend_config=backend_config(cfg))
        except BaseException:
            interrupts.stop.set()  # a ServerApp thread still waiting for replies winds down
            raise
        finally:
            # Flower's backend already shut Ray down on the normal path; this covers errors raised before it.
            if ray.is_initialized():
                ray.shutdown()


@contextmanager
def interrupted_quietly(stop: threading.Event) -> Iterator[None]:
    """Around a ServerApp's body: once ``stop`` is set, its RunInterrupted ends the ServerApp thread
    quietly (the statuses are written by then, and the runner raises in the main thread); Flower
    catches only Exception there, and a KeyboardInterrupt would print a thread traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if not stop.is_set():
            raise


# --------------------------------------------------------------------------- messages


def wait_for_nodes(grid: Any, n: int, timeout_s: float = 120.0, stop: Optional[threading.Event] = None) -> list[int]:
    """Block until `n` nodes are registered (the ServerApp may start before the SuperNodes); their ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if stop is not None and stop.is_set():
            raise RunInterrupted("interrupted while waiting for nodes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {n} nodes registered within {timeout_s:.0f} s")
        time.sleep(0.05)


def exchange(grid: Any, messages: Iterable[Any], timeout_s: float = 3600.0,
             stop: Optional[threading.Event] = None) -> list[Any]:
    """`grid.send_and_receive`, but it polls faster and raises RunInterrupted as soon as `stop` is set.

    Replies come back in any order; a node that crashed answers with an error Message. Nodes that
    do not answer within `timeout_s` are simply missing from the result.
    """
    pending = set(grid.push_messages(list(messages)))
    replies: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise RunInterrupted("interrupted while waiting for replies")
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(PULL_INTERVAL_S)
    return replies


def worker_config(cfg: RunConfig) -> RunConfig:
    """The config clients and nodes get: data root and decoded cache as absolute paths resolved on the
    driver, so that Ray workers (other processes, other working directories, other machines of a
    cluster without FEDEPIC_DATA) read the same files as the driver."""
    data = dataclasses.replace(cfg.data, root=str(default_root(cfg.data).resolve()),
                               cache_dir=str(cache_dir(cfg.data).resolve()))
    return dataclasses.replace(cfg, data=data, progress=False)


def check_failures(cfg: RunConfig, what: str, failures: Sequence[Mapping[str, Any]], asked: int) -> None:
    """Raise RunFailed when every one of ``asked`` clients failed, or more than clients.max_failed_fraction."""
    limit = cfg.clients.max_failed_fraction
    if asked and failures and (len(failures) == asked or len(failures) > limit * asked):
        raise RunFailed(f"{what}: {len(failures)} of {asked} clients failed (clients.max_failed_fraction={limit}); "
                        f"first: {last_line(str(failures[0].get('reason', '?')))}")


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of an error text (a Ray traceback ends with the exception's message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "?")[:limit]


# --------------------------------------------------------------------------- client data


@dataclass(frozen=True)
class ClientData:
    """One client's share of the training set, after its data attack (if it is malicious)."""

    client_id: int
    rows: np.ndarray  # indices into data.train_x / train_y
    x: torch.Tensor  # uint8 [n, C, H, W]
    y: torch.Tensor  # int64 [n]
    poisoned: torch.Tensor  # bool [n]: rows the attack changed
    is_malicious: bool

    def __len__(self) -> int:
        return len(self.y)


def client_partition(cfg: RunConfig, data: ImageData) -> list[np.ndarray]:
    """Row indices per client, reproducible from cfg.seed (the same split for every strategy)."""
    return partition(data.train_y.numpy(), cfg.clients.count, cfg.data, cfg.seed)


@lru_cache(maxsize=4)
def _load_poison_set(path: str):
    from fedepic.attacks.gradient_matching import load_poisons

    return load_poisons(path)


def poison_set(cfg: RunConfig):
    """The saved Witches' Brew poison set for attack.data=gradient_matching (FL reuses, never brews)."""
    if cfg.attack.data != "gradient_matching":
        return None
    if not cfg.attack.poisons:
        raise ConfigError("invalid value None for key 'attack.poisons': federated gradient_matching needs a saved "
                          "poison set (brew one with mode=centralized, then pass attack.poisons=FILE.npz)")
    return _load_poison_set(str(cfg.attack.poisons))


def checked_poison_set(cfg: RunConfig, data: ImageData):
    """`poison_set`, refused (one-line DataError / ConfigError) unless it fits ``data`` and attack.eps."""
    poisons = poison_set(cfg)
    if poisons is not None:
        from fedepic.attacks.gradient_matching import check_poisons

        check_poisons(poisons, data.train_x, data.train_y, data.test_y, data.num_classes, cfg.attack.eps)
    return poisons


def client_seed(cfg: RunConfig, client_id: int) -> int:
    return cfg.seed * 100_003 + 7919 * (client_id + 1)


def build_client_data(cfg: RunConfig, data: ImageData, client_id: int,
                      parts: Optional[Sequence[np.ndarray]] = None) -> ClientData:
    """Client `client_id`'s rows, attacked when it is malicious; deterministic from cfg.seed.

    Data attacks of a malicious client:
    - label_flip: every flippable row of the client (fraction 1.0; Tolpegin et al. 2020's setting);
    - backdoor: attack.backdoor_fraction of the client's non-target rows get the trigger (BadNets);
    - gradient_matching: the rows of the saved poison set (attack.poisons) that fall in this client's
      partition are replaced by their poisoned versions; poisons in benign partitions stay clean.
    """
    if not 0 <= client_id < cfg.clients.count:
        raise ValueError(f"client_id {client_id} outside [0, clients.count={cfg.clients.count})")
    parts = client_partition(cfg, data) if parts is None else parts
    rows = np.asarray(parts[client_id], dtype=np.int64)
    index = torch.from_numpy(rows)
    x, y = data.train_x[index], data.train_y[index]
    malicious = client_id in set(malicious_ids(cfg))
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    if malicious and cfg.attack.data in ("label_flip", "backdoor"):
        fraction = 1.0 if cfg.attack.data == "label_flip" else cfg.attack.backdoor_fraction
        attacked = poison_rows(cfg.attack, x, y, data.num_classes, fraction=fraction, seed=client_seed(cfg, client_id))
        x, y, poisoned = attacked.x, attacked.y, attacked.poisoned
    elif malicious and cfg.attack.data == "gradient_matching":
        poisons = checked_poison_set(cfg, data)
        position = {int(r): i for i, r in enumerate(rows)}
        hits = [(position[int(r)], j) for j, r in enumerate(poisons.indices.tolist()) if int(r) in position]
        if hits:
            local, source = (torch.tensor(v, dtype=torch.int64) for v in zip(*hits))
            x = x.clone()
            x[local] = poisons.poisoned_x[source].to(x.dtype)
            poisoned[local] = True
    return ClientData(client_id, rows, x, y, poisoned, malicious)


def partition_report(cfg: RunConfig, data: ImageData, parts: Optional[Sequence[np.ndarray]] = None) -> dict:
    """Label histogram and size per client, and the malicious ids (written to the run's summary)."""
    parts = client_partition(cfg, data) if parts is None else parts
    hist = label_histograms(data.train_y.numpy(), parts, data.num_classes)
    return {"clients": cfg.clients.count, "sizes": [int(len(p)) for p in parts], "label_histograms": hist,
            "malicious": malicious_ids(cfg), "partition": cfg.data.partition}


# --------------------------------------------------------------------------- memoised node inputs
# Each ClientApp call ships only the run's config as YAML text; a Ray actor process decodes it and
# loads the dataset once (the memo Flower's own examples keep for their FederatedDataset), then
# cuts each client's partition out of it. Keyed by the config text, so two runs never mix.


@lru_cache(maxsize=4)
def config_from_text(text: str) -> RunConfig:
    """The RunConfig the ServerApp sent (schema defaults <- its YAML), validated."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


@lru_cache(maxsize=2)
def dataset_for(text: str) -> ImageData:
    cfg = config_from_text(text)
    return load_dataset(cfg.data, cfg.seed)


@lru_cache(maxsize=2)
def partition_for(text: str) -> list[np.ndarray]:
    return client_partition(config_from_text(text), dataset_for(text))


@lru_cache(maxsize=1024)
def client_data_for(text: str, client_id: int) -> ClientData:
    return build_client_data(config_from_text(text), dataset_for(text), client_id, partition_for(text))
