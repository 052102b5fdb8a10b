"""Flower and Ray plumbing of the simulations: quiet logs, the Ray backend config, a bounded check of
``ray.address``, and a `run_simulation` that is safe under SIGINT and SIGTERM.

Ray and the node registration race:
- a local cluster is started with ``address="local"``: without it ``ray.init()`` attaches to any
  cluster found in /tmp/ray/ray_current_cluster (a `ray start --head` someone else runs);
- a ClientApp message whose worker process dies is not run again (`client_messages_run_once`): it
  is that round's failure, and the worker is restarted for the next messages;
- every Ray process the run starts is gone when `run_flower` returns or raises: Flower's backend
  calls ``ray.shutdown()``, and `run_flower` calls it again on every exit path. An attached external
  cluster is only disconnected from (its nodes keep running; this job's actors end with the driver).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Iterator, Optional

from fedepic.config import ConfigError, RunConfig
from fedepic.interrupts import Interrupts
from simulations import RAY_IMPORT_DEFAULTS


ENV_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                # and those Ray reads when first imported (absl's failure signal handler off: SIGTERM
                # otherwise aborted the run instead of stopping it), set in simulations/__init__.py
                **RAY_IMPORT_DEFAULTS}


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


def uses_ray_client(cfg: RunConfig) -> bool:
    """Whether ``ray.address`` attaches through Ray Client: ``ray://...``, or ``auto`` with such a RAY_ADDRESS."""
    address = cfg.ray.address or ""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    return address.startswith("ray://")


def backend_config(cfg: RunConfig, run_once: bool = True) -> dict:
    """`backend_config` for `flwr.simulation.run_simulation`; `init_args` go straight to `ray.init`.
    ``run_once``: ClientAppActor.run's own retries are 0 (`client_messages_run_once` could set them);
    where they are not, the actors' retries are 0, so that a death is never absorbed by a retry."""
    init_args: dict[str, Any] = {"log_to_driver": False}
    if cfg.ray.address:
        init_args["address"] = cfg.ray.address  # the cluster decides its size: no num_cpus here
    else:
        init_args["address"] = "local"  # never attach to a cluster that happens to run on this host
        # No dashboard for a run-scoped local cluster: its processes cost CPU at every start (measured
        # below in docs/results/engines.md) and nobody watches them; an attached cluster keeps its own.
        init_args["include_dashboard"] = False
        if cfg.ray.num_cpus is not None:
            init_args["num_cpus"] = int(cfg.ray.num_cpus)
    return {
        # Flower passes client_resources to `ClientAppActor.options(...)`. max_restarts=-1: a worker
        # process that dies (segfault, OOM kill, os._exit, SIGKILL) is restarted; without it the dead
        # actor stays in Flower's pool and every later message it is given fails. The message the
        # worker was running is not retried (`run_flower` sets ClientAppActor.run's own retries to 0,
        # `client_messages_run_once`): the death reaches the ServerApp or router as an error reply and
        # is recorded in that round's `failures`. (A retry answered it from the restarted worker, and
        # the death went unrecorded.) The actor's max_task_retries is 1, not 0, only because with 0 Ray
        # fails every message sent to the actor while it restarts ("The actor is restarting"), and
        # Flower's pool hands that actor the next messages at once: one death failed other clients too.
        # Through Ray Client (ray://) the actors are created by the client server from Flower's class as
        # it imports it, so the method's setting cannot reach them: there the actor's retries are 0, a
        # death is still recorded, and messages sent to that worker while it restarts fail with it.
        "client_resources": {"num_cpus": float(cfg.ray.client_cpus), "num_gpus": float(cfg.ray.client_gpus),
                             "max_restarts": -1,
                             "max_task_retries": 1 if run_once and not uses_ray_client(cfg) else 0},
        "init_args": init_args,
    }


@contextmanager
def ray_leaves_sigterm_alone() -> Iterator[None]:
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


@contextmanager
def method_retries(actor_class: Any, method: str, retries: int) -> Iterator[bool]:
    """While inside, actors of ``actor_class`` created here retry ``method``'s tasks ``retries`` times
    when their worker dies (what ``@ray.method(max_task_retries=...)`` on the class would do), whatever
    the actor's own max_task_retries. Ray reads a method's retries from the class's metadata when an
    actor is created; that is where they are set. Yields whether it could (False where the class has
    no such metadata, e.g. a Ray release that moved it: tests/test_worker_death.py then fails)."""
    meta = getattr(actor_class, "__ray_metadata__", None)
    table = getattr(getattr(meta, "method_meta", None), "max_task_retries", None)
    if not isinstance(table, dict):
        yield False
        return
    missing = object()
    before = table.get(method, missing)
    table[method] = retries
    try:
        yield True
    finally:
        if before is missing:
            table.pop(method, None)
        else:
            table[method] = before


@contextmanager
def client_messages_run_once() -> Iterator[bool]:
    """While inside, Ray never runs a message to a ClientApp (a `ClientAppActor.run` task) again when
    its worker died: the death reaches the ServerApp or router as an error reply. The actor's own
    max_task_retries stays as `backend_config` sets it, not 0, so that messages sent to the actor while
    its worker restarts wait for it instead of failing too. Flower calls ``actor.run.remote(...)``
    with no options, hence the class-level setting (`method_retries`). ``terminate`` ends the actor
    with ``exit_actor`` on purpose: with a retry left, Ray logged that exit at every shutdown as a
    failed task to be retried, so it gets none either."""
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    with method_retries(ClientAppActor, "run", 0) as done, method_retries(ClientAppActor, "terminate", 0):
        yield done


RAY_CONNECT_TIMEOUT_S = 10.0  # the most `check_ray_address` waits: TCP connect and one Ray RPC together


def _connect_within(host: str, port: int, deadline: float) -> None:
    """A TCP connection to ``host``:``port`` (then closed) before ``deadline`` (time.monotonic), name
    resolution included: getaddrinfo has no timeout of its own, so it runs on a helper thread, and each
    address it gives gets the time left. Raises OSError (socket.timeout when the time is up)."""
    found: list = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            found.append(err)

    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    resolver.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise socket.timeout(f"resolving {host} took longer than the time left")
    if isinstance(found[0], OSError):
        raise found[0]
    last: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _, address in found[0]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(left)
            try:
                sock.connect(address)
                return
            except OSError as err:
                last = err
    raise last


RAY_CLIENT_PORT = 10001  # Ray Client's default (ray://HOST)


def _ray_target(address: str) -> tuple[bool, str, int]:
    """(Ray Client?, host, port) of ``ray.address``: ``auto`` (RAY_ADDRESS, else the cluster `ray start`
    recorded on this machine), ``HOST:PORT`` or ``[IPv6]:PORT`` (a cluster's GCS), ``ray://HOST[:PORT]``
    (a Ray Client server)."""
    target = address
    if target == "auto" and os.environ.get("RAY_ADDRESS"):
        target = os.environ["RAY_ADDRESS"]  # what ray.init("auto") reads first
    if target == "auto":
        from ray._common.utils import get_ray_address_file  # where `ray start` records the cluster

        current = Path(get_ray_address_file(None))
        if not current.is_file():
            raise ConfigError(f"invalid value 'auto' for key 'ray.address': no Ray cluster runs on this machine "
                              f"({current} not found; start one with `ray start --head`)")
        target = current.read_text().strip()
    client = target.startswith("ray://")
    target = target.removeprefix("ray://")
    if client and target and not re.search(r":\d+$", target):
        target = f"{target}:{RAY_CLIENT_PORT}"
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or "/" in target:
        raise ConfigError(f"invalid value {address!r} for key 'ray.address': expected auto, HOST:PORT or "
                          f"ray://HOST:PORT")
    return client, host, int(port)


def _ray_rpc(client: bool, host: str, port: int, timeout_s: float) -> None:
    """One call that only Ray answers, with a deadline: the GCS's GetClusterId, or Ray Client's ping.
    Raises grpc.RpcError. The channel is Ray's own (TLS and token authentication as `ray.init` has them)."""
    import uuid

    from ray._private.gcs_utils import create_gcs_channel
    from ray._private.grpc_utils import init_grpc_channel

    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if client:
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

        with init_grpc_channel(endpoint) as channel:
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=timeout_s,
                metadata=[("client_id", uuid.uuid4().hex)])
    else:
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        with create_gcs_channel(endpoint) as channel:
            reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        if reply.status.code != 0 or not reply.cluster_id:
            raise _NotRay(f"its GCS answered with status {reply.status.code} {reply.status.message!r}")


class _NotRay(Exception):
    """An answer, but not a usable Ray cluster's."""


def check_ray_address(cfg: RunConfig, timeout_s: Optional[float] = None) -> None:
    """A ConfigError naming ``ray.address`` unless a Ray cluster answers there within ``timeout_s``
    (default RAY_CONNECT_TIMEOUT_S, 10 s) in all: its port accepts a TCP connection, and its GCS
    answers a GetClusterId call (with ``ray://``: the Ray Client server answers a ping).

    `ray.init` keeps retrying an address where no cluster answers for minutes, and then hangs in
    shutdown; an HTTP server, a closed port, another gRPC server or a listener that never answers are
    all refused here, before a run folder exists. "auto" reads the address of the cluster started on
    this machine (`ray start`), or RAY_ADDRESS.
    """
    address = cfg.ray.address
    if not address:
        return
    timeout_s = RAY_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    client, host, port = _ray_target(address)
    where = f"{'ray://' if client else ''}{f'[{host}]' if ':' in host else host}:{port}"

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"invalid value {address!r} for key 'ray.address': no Ray cluster answers at "
                           f"{where} within {timeout_s:g} s ({why})")

    deadline = time.monotonic() + timeout_s
    try:
        _connect_within(host, port, deadline)
    except OSError as err:
        raise refuse(err.strerror or str(err) or type(err).__name__) from None
    import grpc

    try:
        _ray_rpc(client, host, port, max(0.1, deadline - time.monotonic()))
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = "the port accepts connections but sent no answer"
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            why = f"a Ray cluster that refused this client: {code.name}; see Ray's token authentication"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            why = ("a gRPC server that is not a Ray Client server answers; a cluster's GCS is HOST:PORT" if client
                   else "a gRPC server that is not Ray's GCS answers; a Ray Client server is ray://HOST:PORT")
        else:  # UNAVAILABLE from an HTTP server: "... Failed parsing HTTP/2 (Expected SETTINGS frame ...)"
            details = err.details() if callable(getattr(err, "details", None)) else str(err)
            details = " ".join(str(details).rpartition("last error: ")[2].split())
            details = re.sub(r"^([A-Z_]+: )?(ipv[46]:\S+: )?", "", details)[:160]
            why = f"the port answers, but not as Ray: gRPC {getattr(code, 'name', 'error')}: {details}"
        raise refuse(why) from None
    except _NotRay as err:
        raise refuse(str(err)) from None


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
    with redirect_stdout(sys.stderr), interrupts, interrupts.polled(), ray_leaves_sigterm_alone(), \
            client_messages_run_once() as run_once:
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                           backend_config=backend_config(cfg, run_once))
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


