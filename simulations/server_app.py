"""The server-based simulation: every strategy of `strategies:` in turn over the same clients, data,
partition, attack and seed, then one comparison table and plot.

Each member's rounds are the round engine's (``fedepic.server_rounds``: sample, node work, attacks,
pre-aggregation, aggregation, server step, evaluation, metrics), run by one of two backends:
``engine=local`` runs every client in this process and aggregates with the tensor rules
(``fedepic.local_backend``); ``engine=ray`` and ``flwr run`` run each client as a Flower ClientApp on
its SuperNode and aggregate with Flower's own strategies (``simulations.flower_backend``). Each member
checkpoints everything that decides its next rounds after every `checkpoint_every`-th round, and a
resumed run (`open_run(cfg, resume=...)`) continues from there: see fedepic/server_checkpoints.py.

`centralized-epic` is a reference row (registry flag ``reference``): all clients' (attacked) rows
pooled and trained centrally with EPIC for rounds * local_epochs epochs (defense.epic warmup /
interval in epochs, as in mode=centralized), evaluated every local_epochs epochs so that its curve
lines up with the rounds.

The same ServerApp runs under `run_simulation` (simulations/federated.py passes the config, the run's
lifecycle and the stop event) and under `flwr run` (module-level `app`: the config file name comes from
run_config["fedepic-config"], optional overrides from run_config["fedepic-overrides"]). Either way the
run folder's statuses, comparison and summary are written by fedepic.lifecycle when the run ends.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Optional

import torch

from fedepic.builders import build_model, epic_schedule
from fedepic.client_work import model_for
from fedepic.checkpoint import Resume, checkpoint_due
from fedepic.client_data import build_client_data, client_partition, partition_report, poison_set, worker_config
from fedepic.columns import FEDERATED
from fedepic.config import RunConfig, load_config, to_yaml
from fedepic.data import ImageData, load_dataset
from fedepic.epic import EpicState
from fedepic.errors import RunInterrupted
from fedepic.extensions import is_reference
from fedepic.interrupts import Interrupts
from fedepic.lifecycle import Comparison, MemberReport, RunLifecycle
from fedepic.local_backend import LocalServerBackend
from fedepic.metrics import diverged_from_round, diverged_members, poison_stats
from fedepic.outputs import RunWriter
from fedepic.report import setting_title
from fedepic.server_checkpoints import elapsed, kept_row_and_curves, restore_root, save_member_checkpoint
from fedepic.server_rounds import (
    Evaluator, MemberResult, Target, append_point, member_row, run_member, with_x,
)
from fedepic.failures import check_failures
from fedepic.train import fit, resolve_device, torch_threads
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from simulations.client_app import CONFIG_KEY, MEMBER_KEY
from simulations.flower_backend import ROUND_TIMEOUT_S, FlowerServerBackend, PartitionGrid, client_metrics
from simulations.flower_runtime import interrupted_quietly, quiet_flower
from simulations.messaging import exchange, wait_for_nodes

NODE_WAIT_S = 300.0
COMPARISON_COLUMNS, PANELS = FEDERATED.columns, FEDERATED.panels


# --------------------------------------------------------------------------- centralized reference


def run_centralized_epic(cfg: RunConfig, data: ImageData, evaluator: Evaluator, member: RunWriter,
                         stop: threading.Event, result: MemberResult, saved: Optional[dict] = None) -> None:
    """Pool every client's (attacked) rows and train one model with EPIC for rounds * local_epochs epochs.

    Checkpoints (model, EPIC mask, `fit`'s state, curves) after every `checkpoint_every`-th round; with
    ``saved`` the training continues after that round's last epoch.
    """
    started = time.perf_counter() - elapsed(saved)
    parts = client_partition(cfg, data)
    clients = [build_client_data(cfg, data, c, parts) for c in range(cfg.clients.count)]
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    poisoned = torch.cat([c.poisoned for c in clients])
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, data, cfg.seed, device)
    epochs = cfg.rounds * cfg.clients.local_epochs
    state = EpicState(len(y), epic_schedule(cfg, "epochs"), device=device)
    if saved is not None:
        model.load_state_dict(saved["model"])
        state.load_state_dict(saved["epic"])
        result.curves = with_x(saved["curves"])
    curves = result.curves

    def epoch_end(epoch: int, net: torch.nn.Module) -> dict:
        if stop.is_set():
            raise RunInterrupted("interrupted")
        stats = state.maybe_select(epoch, net, x, y, poisoned) or {}
        if epoch % cfg.clients.local_epochs == 0:
            ev = evaluator.measure(net)
            append_point(curves, epoch // cfg.clients.local_epochs, ev["accuracy"], ev["attack_success"])
            member.log({"round": epoch // cfg.clients.local_epochs, "epoch": epoch, "strategy": "centralized-epic",
                        **ev, "epic": stats or None, "dropped_total": int((~state.keep).sum())})
        return {}

    def on_state(epoch: int, fit_state: dict) -> None:
        rnd, within = divmod(epoch, cfg.clients.local_epochs)
        if within == 0 and checkpoint_due(cfg.checkpoint_every, rnd, cfg.rounds):
            save_member_checkpoint(member, {
                "member": "centralized-epic", "round": rnd, "fit": fit_state, "curves": curves,
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "epic": {"keep": state.keep.clone(), "selections": state.selections}}, started)

    fit(model, x, y, cfg.train, seed=cfg.seed, device=device, epochs=epochs, keep=state.keep, epoch_end=epoch_end,
        resume=saved["fit"] if saved is not None else None, on_state=on_state)
    dropped = ~state.keep
    row = member_row("centralized-epic", curves, time.perf_counter() - started)
    row["poison_recall"] = poison_stats(dropped, poisoned)["poison_recall"] if poisoned.any() else None
    row["failures"] = 0
    result.row = row


# --------------------------------------------------------------------------- the whole comparison


def _target(cfg: RunConfig, data: ImageData) -> Target:
    poisons = poison_set(cfg)
    if poisons is None:
        return Target()
    x = data.test_x[poisons.target_index:poisons.target_index + 1].float() / 255
    return Target(x, poisons.adversarial_class)


def _wait_for_clients(grid: PartitionGrid, cfg: RunConfig, stop: threading.Event) -> dict:
    """One SuperNode per client: wait until all registered (the registration race), refuse extra ones,
    then warm every node up with a query message (actors start, import, load their rows), so that the
    first member's round times do not include the start-up; the replies name each node's partition
    (``grid.partitions``). A node that fails the warm-up is only noted here: its failures are recorded
    again, round by round, in training."""
    started = time.perf_counter()
    try:
        nodes = wait_for_nodes(grid, cfg.clients.count, NODE_WAIT_S, stop)
    except TimeoutError as err:
        raise TimeoutError(f"{err}; start one SuperNode per client (clients.count={cfg.clients.count}; "
                           "with `flwr run`: --federation-config num-supernodes=N)") from None
    if len(nodes) != cfg.clients.count:
        raise ValueError(f"{len(nodes)} SuperNodes registered but clients.count={cfg.clients.count}; "
                         "the run needs exactly one SuperNode per client")
    text = to_yaml(worker_config(cfg))
    queries = [Message(content=RecordDict({"config": ConfigRecord({CONFIG_KEY: text})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in nodes]
    replies = exchange(grid, queries, ROUND_TIMEOUT_S, stop)
    for msg in (m for m in replies if not m.has_error()):
        metrics = client_metrics(msg)
        if "partition-id" in metrics:
            grid.partitions[int(msg.metadata.src_node_id)] = int(metrics["partition-id"])
    failed = [m.error.reason for m in replies if m.has_error()]
    return {"event": "clients_ready", "seconds": time.perf_counter() - started, "warmup_failures": failed}


def _report(name: str, result: MemberResult, started: float) -> MemberReport:
    """A member's summary (its row and curves) and comparison row; a member cut short gets the row of
    the rounds it finished."""
    row = result.row or member_row(name, result.curves, time.perf_counter() - started)
    return MemberReport({"strategy": name, **row, "curves": result.curves}, row, result.curves)


def backend(grid: Optional[PartitionGrid], cfg: RunConfig, name: str, data: ImageData,
            stop: threading.Event) -> object:
    """Member ``name``'s backend: in this process without a grid (engine=local), else Flower's."""
    if grid is None:
        parts = client_partition(cfg, data)
        return LocalServerBackend(cfg, name, data, [build_client_data(cfg, data, c, parts)
                                                    for c in range(cfg.clients.count)])
    config = {CONFIG_KEY: to_yaml(worker_config(cfg)), MEMBER_KEY: name}
    return FlowerServerBackend(cfg, name, grid, config, stop, model_for(cfg, data))


def _run_member(grid: Optional[PartitionGrid], cfg: RunConfig, name: str, data: ImageData, evaluator: Evaluator,
                life: RunLifecycle, stop: threading.Event) -> dict:
    """One member in its sub-folder (fedepic.lifecycle); returns its comparison row. A member a resumed
    run found finished is kept as it is (its row and curves read back)."""
    if life.kept(name):
        row, curves = kept_row_and_curves(life.kept_summary(name))
        life.keep(name, row, curves)
        return row
    saved = life.checkpoint(name)
    result = MemberResult()
    started = time.perf_counter() - elapsed(saved)
    member = life.open_member(name, lambda: _report(name, result, started),
                              saved["offsets"]["member"] if saved is not None else None)
    member.write_config(to_yaml(cfg))
    if is_reference(name):
        run_centralized_epic(cfg, data, evaluator, member, stop, result, saved)
    else:
        initial = {k: v.detach().cpu() for k, v in build_model(cfg, data, cfg.seed, torch.device("cpu")).state_dict().items()}
        run_member(cfg, name, backend(grid, cfg, name, data, stop), initial, evaluator, member, stop, result,
                   check_failures, saved)
    life.complete(name)
    return result.row


def open_run(cfg: RunConfig, *, interrupts: Optional[Interrupts] = None,
             resume: Optional[Resume] = None) -> RunLifecycle:
    """The lifecycle of a federated run folder: enter it, :func:`serve` in it, and leaving it writes the
    statuses, the comparison and the root summary (fedepic.lifecycle)."""
    return RunLifecycle(cfg, list(cfg.strategies), Comparison(COMPARISON_COLUMNS, PANELS, setting_title(cfg)),
                        interrupts=interrupts, resume=resume)


def serve(grid: Optional[Grid], cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> list[dict]:
    """Run every member of `cfg.strategies` in ``life``'s run folder (:func:`open_run`); returns the
    comparison rows. A resumed ``life`` continues the interrupted run (fedepic/server_checkpoints.py).

    For the duration of the call (both are restored afterwards):
    - train.threads, when set, applies to the server-side evaluation and centralized-epic;
    - the heap that exists at the start (modules, torch, Ray) is frozen (`gc.freeze`): Flower's
      Bulyan converts every reply with `to_numpy_ndarrays(keep_input=False)`, which runs a full
      `gc.collect()` per reply; with the long-lived heap frozen, each collection walks only
      the round's new objects, not the whole heap (docs/results/engines.md).
    """
    gc.collect()
    gc.freeze()
    try:
        with torch_threads(cfg.train.threads):
            return _serve(PartitionGrid(grid) if grid is not None else None, cfg, life, stop)
    finally:
        gc.unfreeze()


def _serve(grid: Optional[PartitionGrid], cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> list[dict]:
    data = load_dataset(cfg.data, cfg.seed)
    target = _target(cfg, data)
    report = partition_report(cfg, data)
    ready: dict = {"seconds": None}
    life.extras = lambda rows: {"clients_ready_seconds": ready["seconds"], "partition": report,
                                "diverged": diverged_members(rows, "strategy", diverged_from_round)}
    evaluator = Evaluator(cfg, data, target)
    # a resumed run keeps the root lines an uninterrupted one has written by now, and does not log them again
    kept = [name for name in cfg.strategies if life.kept(name)]
    ready_logged, members_logged = restore_root(life.root, kept) if life.resume is not None else (False, [])
    if grid is not None and any(not is_reference(m) for m in cfg.strategies):
        warmup = _wait_for_clients(grid, cfg, stop)  # a resumed run's nodes are new: they warm up again
        if not ready_logged:
            life.root.log(warmup)
        ready["seconds"] = warmup["seconds"]
    for name in cfg.strategies:
        row = _run_member(grid, cfg, name, data, evaluator, life, stop)
        if name not in members_logged:
            life.root.log({"event": "member", **row})
    return life.rows


def make_server_app(cfg: RunConfig, life: RunLifecycle, stop: threading.Event) -> ServerApp:
    """A ServerApp bound to a config and a run folder (the run_simulation path; see federated.py)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        with interrupted_quietly(stop):
            serve(grid, cfg, life, stop)

    return server


def config_from_run_config(run_config: dict) -> RunConfig:
    """`flwr run`: the config file named by run_config["fedepic-config"], plus space-separated
    key=value pairs from run_config["fedepic-overrides"]; mode is forced to federated."""
    name = str(run_config.get("fedepic-config", "server_noniid.yaml"))
    overrides = str(run_config.get("fedepic-overrides", "")).split()
    return load_config(name, ["mode=federated", *overrides])


app = ServerApp()


FLOWER_EXIT_GRACE_S = 30.0


@app.main()
def flwr_run_main(grid: Grid, context: Context) -> None:
    """`flwr run`: one line when the run folder opens and one when it closes (its status), on the log
    stream (`flwr run --stream`, `flwr log`): Flower's own INFO lines are quieted, and a healthy run is
    otherwise silent for minutes. The folder is under the SuperLink's working directory.

    When the Flower runtime exits first (`flwr stop`, SIGINT or SIGTERM, the SuperLink gone), the run
    stops at the next message boundary and its folder is marked "interrupted" (see
    :func:`stop_on_flower_exit`), instead of being left ``.partial``.
    """
    quiet_flower()
    cfg = config_from_run_config(dict(context.run_config))
    life = open_run(cfg)
    stop, done = threading.Event(), threading.Event()
    stop_on_flower_exit(stop, done)  # after anything that may raise before the try: its finally sets done
    folder = life.root.final_dir.absolute()  # relative paths are the SuperLink's working directory's
    entered = False
    try:
        print(f"fedepic: run folder {folder} ({', '.join(cfg.strategies)}; {cfg.rounds} rounds, "
              f"{cfg.clients.count} clients)", flush=True)
        with interrupted_quietly(stop), life:
            entered = True
            serve(grid, cfg, life, stop)
    except BaseException as err:
        if not entered:  # the folder could not be opened (a full disk): nothing was written
            print(f"fedepic: run not started: {err}", flush=True)
        raise
    finally:
        done.set()
        if entered:
            status = life.root.status if life.root.status != "running" else "completed"
            print(f"fedepic: run {status}: {folder}", flush=True)


def stop_on_flower_exit(stop: threading.Event, done: threading.Event,
                        grace_s: float = FLOWER_EXIT_GRACE_S) -> None:
    """`flwr-simulation` ends through `flwr_exit` (flwr/supercore/exit/exit.py) on SIGINT or SIGTERM, which
    it also raises itself when its run is stopped or its SuperLink is gone: that calls the registered exit
    handlers, then force-exits 5 s after the first phase of them. The one added here (first phase) sets
    the ServerApp's ``stop`` and waits up to ``grace_s`` for ``done`` (the run folder written)."""
    from flwr.supercore.exit import add_exit_handler

    def wind_down() -> None:
        if not done.is_set():
            stop.set()
            done.wait(grace_s)

    add_exit_handler(wind_down, run_before_force_exit=True)
