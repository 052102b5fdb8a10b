"""``ray.address`` at something that is not a Ray cluster is refused in one line, exit 2, within the bound
(simulations.flower_runtime.RAY_CONNECT_TIMEOUT_S), before anything is written; a real cluster passes.

Before the GCS call, an HTTP server on the port hung the run (no exit after 110 s; SIGTERM then took
another 300 s) and another non-Ray port ended after 38 s in a traceback: only a TCP connect was made.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import pytest

from fedepic.config import ConfigError, load_config
from simulations.flower_runtime import RAY_CONNECT_TIMEOUT_S, check_ray_address
from tests.test_federated import PYTHON, free_port, group_members, ray_head, run_in_group

STARTUP_MARGIN_S = 20.0  # the CLI's own start (imports) on a busy 2-core machine, on top of the bound


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    """A plain HTTP server (what `python -m http.server` runs)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A listener that accepts connections and never sends a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[int]:
    """A gRPC server with no services (UNIMPLEMENTED for every call, Ray's included)."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture
def closed_port() -> int:
    """A port nobody listens on: bound, then closed."""
    return free_port()


BAD = ["http", "silent", "grpc", "closed", "client-http", "client-grpc"]


def bad_address(kind: str, request: pytest.FixtureRequest) -> str:
    scheme = "ray://" if kind.startswith("client-") else ""
    port = request.getfixturevalue(f"{kind.removeprefix('client-')}_port")
    return f"{scheme}127.0.0.1:{port}"


def run_cli(args: list[str], out: Path, timeout_s: float = 120) -> tuple[int, str, float]:
    """The CLI in its own process group; (exit status, stderr, seconds)."""
    started = time.monotonic()
    done = run_in_group([PYTHON, "-m", "fedepic.simulate", *args, f"output_dir={out}"], timeout_s)
    return done.returncode, done.stderr, time.monotonic() - started


def assert_refused(rc: int, err: str, elapsed: float, out: Path, address: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"fedepic: error: invalid value {address!r} for key 'ray.address'"), lines[0]
    assert "Traceback" not in err
    assert not out.exists(), sorted(out.rglob("*"))  # nothing written, not even the output folder
    assert elapsed < RAY_CONNECT_TIMEOUT_S + STARTUP_MARGIN_S, elapsed


@pytest.mark.parametrize("kind", BAD)
def test_check_ray_address_refuses_what_is_not_ray_within_its_deadline(kind, request):
    """In process, with a 2 s bound: every kind of non-Ray endpoint is refused in time, and says why."""
    address = bad_address(kind, request)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"'ray.address': no Ray cluster answers at .* within 2 s \(") as info:
        check_ray_address(load_config("dfl_smoke.yaml", [f"ray.address={address}"]), timeout_s=2)
    assert time.monotonic() - started < 3.0
    why = str(info.value).rpartition(" within 2 s ")[2]
    expected = {"http": "not as Ray", "silent": "sent no answer", "grpc": "not Ray's GCS",
                "closed": "refused", "client-http": "not as Ray", "client-grpc": "not a Ray Client server"}[kind]
    assert expected in why, why


def test_an_ipv6_address_is_probed_too():
    """``[::1]:PORT`` (on the command line: ray.address='"[::1]:PORT"'): an HTTP server there is refused."""

    class V6Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    try:
        server = V6Server(("::1", 0), http.server.SimpleHTTPRequestHandler)
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"[::1]:{server.server_address[1]}"
        with pytest.raises(ConfigError, match=rf"answers at \[::1\]:{server.server_address[1]} within 2 s \(the port "
                                              r"answers, but not as Ray"):
            check_ray_address(load_config("dfl_smoke.yaml", [f'ray.address="{address}"']), timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("address", ["http://127.0.0.1:80", "127.0.0.1", "ray://h:1/x", "nonsense"])
def test_an_address_that_is_no_host_and_port_is_refused(address):
    with pytest.raises(ConfigError, match="'ray.address': expected auto, HOST:PORT or ray://HOST:PORT"):
        check_ray_address(load_config("dfl_smoke.yaml", [f"ray.address={address}"]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD)
def test_the_cli_refuses_a_non_ray_address_in_one_line(kind, request, tmp_path):
    """The command line, under the default bound: exit 2, one line, no traceback, no folder."""
    address = bad_address(kind, request)
    rc, err, elapsed = run_cli(["config=dfl_smoke.yaml", f"ray.address={address}"], tmp_path / "runs")
    assert_refused(rc, err, elapsed, tmp_path / "runs", address)
    if kind == "silent":  # the one case that waits for the deadline
        assert RAY_CONNECT_TIMEOUT_S - 0.5 < elapsed, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["config=server_noniid.yaml"],  # federated
    ["config=dfl_smoke.yaml", "mode=decentralized"],
    ["config=dfl_smoke.yaml", "engine=local", "sweep.seed=[0,1]"],  # a parallel sweep: cells as Ray tasks there
    ["config=dfl_smoke.yaml", "sweep.seed=[0,1]", "sweep.parallel=false"],  # one at a time, each attaching
], ids=["federated", "decentralized", "parallel-sweep", "sequential-sweep"])
def test_every_entry_point_checks_the_address_before_writing(args, http_port, tmp_path):
    address = f"127.0.0.1:{http_port}"
    rc, err, elapsed = run_cli([*args, f"ray.address={address}"], tmp_path / "runs")
    assert_refused(rc, err, elapsed, tmp_path / "runs", address)


@pytest.mark.slow
def test_a_real_cluster_passes_the_check(monkeypatch):
    """A cluster this test starts (tests.test_federated.ray_head): its GCS (HOST:PORT, `auto` through
    RAY_ADDRESS) and its Ray Client server (ray://) pass; the two ports swapped do not."""
    client_port = free_port()
    with ray_head("ra", client_port) as (head, port):
        def check(address: str) -> float:
            started = time.monotonic()
            check_ray_address(load_config("dfl_smoke.yaml", [f"ray.address={address}"]))
            return time.monotonic() - started

        assert check(f"127.0.0.1:{port}") < RAY_CONNECT_TIMEOUT_S
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        assert check("auto") < RAY_CONNECT_TIMEOUT_S
        monkeypatch.delenv("RAY_ADDRESS")
        deadline = time.monotonic() + 30  # the Ray Client server may start after the runtime's line
        while True:
            try:
                assert check(f"ray://127.0.0.1:{client_port}") < RAY_CONNECT_TIMEOUT_S
                break
            except ConfigError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with pytest.raises(ConfigError, match="not Ray's GCS answers; a Ray Client server is ray://HOST:PORT"):
            check(f"127.0.0.1:{client_port}")
        with pytest.raises(ConfigError, match="not a Ray Client server answers; a cluster's GCS is HOST:PORT"):
            check(f"ray://127.0.0.1:{port}")
        assert head.poll() is None and group_members(head.pid)
