"""The server-based per-step protocol (server.protocol=per_step) and the in-process engine of the
server-based mode (engine=local, fedepic/local_backend.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedepic.builders import build_model
from fedepic.config import load_config
from fedepic.data import load_dataset
from fedepic.errors import ConfigError
from fedepic.stacked import gradients_in_state_layout, stacked_gradients
from fedepic.train import evaluate
from fedepic.vectors import flatten_state
from fedepic.client_data import build_client_data, client_partition, client_seed
from fedepic.client_work import minibatch_rows
from tests.test_federated import ENV, PYTHON, REPO, small_overrides
from tests.test_resume import metrics_lines, only_folder, serve_locally


def per_step_config(out: Path, *extra: str):
    base = ["mode=federated", "name=p", f"output_dir={out}", "progress=false", "data.name=mnist",
            "data.train_per_class=30", "data.test_per_class=20", "model.name=mlp", "server.protocol=per_step",
            "train.lr=0.1", "train.client_momentum=0.9", "server.weight_decay=0.01", "train.batch_size=16",
            "train.threads=1", "rounds=6"]
    keys = {e.split("=", 1)[0] for e in extra}
    return load_config(None, [b for b in base if b.split("=", 1)[0] not in keys] + list(extra))


def assert_close(got, want, where: str, rel: float = 1e-5) -> None:
    """Equal JSON values, floats within ``rel``."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}", rel)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{i}]", rel)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=1e-7), where
    else:
        assert got == want, where


def records(folder: Path, member: str) -> list[dict]:
    return [json.loads(line) for line in (folder / member / "metrics.jsonl").read_text().splitlines()]


def test_per_step_without_attackers_is_minibatch_sgd_with_momentum_on_the_pooled_data(tmp_path, task_identity):
    """One client holding all rows: m <- beta m + (1 - beta) g, w <- w - lr (m + wd w), written by hand
    with autograd, gives the run's test loss after every round. beta = train.client_momentum = 0.7 and
    wd = server.weight_decay = 0.01, neither what train.momentum and train.weight_decay hold (0.9,
    5e-4): a run that read those would differ."""
    cfg = per_step_config(tmp_path, "clients.count=1", "strategies=[fedavg]", "train.milestones=[4]",
                          "train.gamma=0.5", "train.client_momentum=0.7")
    assert (cfg.train.client_momentum, cfg.server.weight_decay) == (0.7, 0.01)
    folder = serve_locally(cfg)
    data = load_dataset(cfg.data, cfg.seed)
    client = build_client_data(cfg, data, 0, client_partition(cfg, data))
    assert len(client) == len(data.train_y)  # the pooled data
    model = build_model(cfg, data, cfg.seed, torch.device("cpu"))
    params = [p for p in model.parameters()]
    momentum = [torch.zeros_like(p) for p in params]
    for rnd, record in enumerate(records(folder, "fedavg"), start=1):
        rows = minibatch_rows(len(client), cfg.train.batch_size, client_seed(cfg, 0) + rnd)
        model.zero_grad()
        F.cross_entropy(model(client.x[rows].float() / 255), client.y[rows]).backward()
        lr = cfg.train.lr * (0.5 if rnd > 4 else 1.0)
        with torch.no_grad():
            for p, m in zip(params, momentum):
                m.mul_(cfg.train.client_momentum).add_((1 - cfg.train.client_momentum) * p.grad)
                p.sub_(lr * (m + cfg.server.weight_decay * p))
        ev = evaluate(model, data.test_x, data.test_y, 1024, data.num_classes, False)
        assert record["loss"] == pytest.approx(ev["loss"], rel=1e-5, abs=1e-6), rnd
        assert record["accuracy"] == pytest.approx(ev["accuracy"])
        assert record["clients"][0]["update_norm"] == pytest.approx(
            float(torch.cat([m.reshape(-1) for m in momentum]).norm()), rel=1e-4)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_the_vectorized_gradients_equal_the_loop_over_clients(model_name):
    """At one shared point (server-based) and at one point per client (decentralized): the gradient of
    every client's minibatch equals autograd's on that client alone."""
    cfg = load_config(None, ["data.name=synthetic", f"model.name={model_name}"])
    data = load_dataset(cfg.data, 0)
    model = build_model(cfg, data, 3, torch.device("cpu"))
    state = model.state_dict()
    n, batch = 3, 5
    xb = data.train_x[: n * batch].float().div(255).reshape(n, batch, *data.train_x.shape[1:])
    yb = data.train_y[: n * batch].reshape(n, batch)
    shared = gradients_in_state_layout(model, state, flatten_state(state), xb, yb)
    points = torch.stack([flatten_state(state) + 0.01 * k for k in range(n)])
    per_point = gradients_in_state_layout(model, state, points, xb, yb)
    for k in range(n):
        for got, offset in ((shared, 0.0), (per_point, 0.01 * k)):
            reference = build_model(cfg, data, 3, torch.device("cpu"))
            with torch.no_grad():
                for p in reference.parameters():
                    p.add_(offset)
            F.cross_entropy(reference(xb[k]), yb[k]).backward()
            want = {name: p.grad for name, p in reference.named_parameters()}
            flat = torch.cat([want[name].reshape(-1) if name in want else torch.zeros(v.numel())
                              for name, v in state.items() if torch.is_floating_point(v)])
            torch.testing.assert_close(got[k], flat, rtol=1e-4, atol=1e-5)
    # the fixed normalisation buffers have no gradient; the parameter-only layout agrees
    params = torch.cat([v.reshape(-1) for v in model.parameters()])
    torch.testing.assert_close(stacked_gradients(model, params, xb, yb),
                               stacked_gradients(model, params.expand(n, -1).contiguous(), xb, yb),
                               rtol=1e-4, atol=1e-6)


def test_per_step_momenta_persist_through_a_resume(tmp_path, task_identity):
    """The server holds every m_i: a run cut after round 3 and resumed over new node ids logs what an
    uninterrupted one does."""
    from fedepic.checkpoint import CHECKPOINT, load_checkpoint, resume_config
    from fedepic.errors import RunInterrupted
    from tests.test_resume import StopAt, assert_same_run

    extra = ("clients.count=4", "clients.malicious_ids=[1]", "attack.model=alie", "strategies=[fedavg,fedtrimmedavg]",
             "defense.trim=1", "defense.pre_aggregation=[clip]", "defense.clip_radius=0.5", "checkpoint_every=1")
    reference = serve_locally(per_step_config(tmp_path / "ref", *extra))
    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted):
        serve_locally(per_step_config(out, *extra), StopAt(out, ".*partial/fedtrimmedavg/metrics.jsonl", 3))
    folder = only_folder(out)
    saved = load_checkpoint(folder / "fedtrimmedavg" / CHECKPOINT)
    assert sorted(saved["progress"]["momentum"]) == [0, 1, 2, 3]
    # the momenta travel as the clients' own ArrayRecords between rounds, but are saved as tensors
    assert all(isinstance(m, torch.Tensor) and m.dim() == 1 for m in saved["progress"]["momentum"].values())
    cfg, point = resume_config(str(folder), None, [])
    assert_same_run(serve_locally(cfg, resume=point), reference, ["fedavg", "fedtrimmedavg"])
    clients = records(reference, "fedtrimmedavg")[-1]["clients"]
    assert all(c["update_norm"] <= 0.5 + 1e-5 for c in clients)  # clipping acts on the momenta


@pytest.mark.parametrize("overrides, key", [
    (["clients.local_epochs=2"], "clients.local_epochs"),
    (["train.augment=crop"], "train.augment"),
    (["defense.local_epic=true"], "defense.local_epic"),
    (["strategies=[fedavg,centralized-epic]"], "strategies"),
    (["model.name=resnet18", "data.name=cifar10"], "model.name"),
    (["server.protocol=steps"], "server.protocol"),
    (["server.lr=0"], "server.lr"),
    (["server.protocol=local_epochs", "server.lr=0.1"], "server.lr"),  # it would be ignored
    (["data.partition_file=split.npz"], "data.partition_file"),  # read only under partition=rows
    (["mode=decentralized"], "server.protocol"),  # a federated protocol
    (["train.momentum=0.5"], "train.momentum"),  # the local optimiser's: per_step uses train.client_momentum
    (["train.nesterov=false"], "train.nesterov"),
    (["train.weight_decay=0.01"], "train.weight_decay"),  # the clients' L2: per_step's is server.weight_decay
])
def test_per_step_refuses_what_it_would_ignore(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        per_step_config(tmp_path, *overrides)


def test_both_engines_give_the_same_federated_run(tmp_path):
    """engine=local (in process: the tensor rules) and engine=ray (Flower's simulation engine: Flower's
    strategies) on one small config, for both protocols and a robust rule that leaves clients out: the
    same metrics and the same excluded clients, apart from timings, within 1e-5 relative (the tensor
    FedAvg is one float32 matrix-vector product, Flower's a numpy loop over the replies, and per-step
    gradients are one batched pass over 4 clients against 4 passes of one: the last bits differ)."""
    def run(out: Path, **extra: str) -> Path:
        args = small_overrides(out, **{"strategies": "[fedavg,fedmedian,krum]", "clients.malicious_ids": "[0]",
                                       "attack.model": "sign_flip", **extra})
        done = subprocess.run([PYTHON, "-m", "fedepic.simulate", *args], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return only_folder(out)

    per_step = {"server.protocol": "per_step", "rounds": "4", "clients.local_epochs": "1",
                "train.client_momentum": "0.5", "server.weight_decay": "5e-4"}
    for name, extra in (("epochs", {}), ("steps", per_step)):
        local = run(tmp_path / f"{name}-local", engine="local", **extra)
        ray = run(tmp_path / f"{name}-ray", **extra)
        for member in ("", "fedavg", "fedmedian", "krum"):
            got = [json.loads(x) for x in metrics_lines(local / member / "metrics.jsonl")]
            want = [json.loads(x) for x in metrics_lines(ray / member / "metrics.jsonl")]
            if member == "":  # Ray's root also logs the warm-up of its workers (pids, seconds)
                want = [r for r in want if r.get("event") != "clients_ready"]
            else:
                assert [r["excluded"] for r in got] == [r["excluded"] for r in want], f"{name}/{member}"
            assert_close(got, want, f"{name}/{member or 'root'}")


def test_every_byzfl_comparison_row_is_a_valid_fedepic_run(tmp_path, task_identity):
    """benchmarks/byzfl_compare.py's fedepic rows load as configs and run two rounds on a saved split
    (its ByzFL half needs the registry and runs only in the benchmark)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("byzfl_compare", REPO / "benchmarks" / "byzfl_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    rows = rng.permutation(60_000)[:400]
    for count in (10, 12):
        np.savez(tmp_path / f"split{count}.npz", **{f"client_{k}": rows[40 * k:40 * (k + 1)] if k < 10 else
                                                   np.zeros(0, dtype=np.int64) for k in range(count)})
    for row, extra in module.FEDEPIC_ROWS.items():
        count = 10 if "clients.count=10" in extra else 12
        cfg = load_config(None, [*module.COMMON, f"data.partition_file={tmp_path / f'split{count}.npz'}", "rounds=2",
                                 "data.test_per_class=10", "train.threads=1", f"output_dir={tmp_path / row}",
                                 f"name={row}", *extra])
        folder = serve_locally(cfg)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed", row
        (member,) = [r for r in records(folder, cfg.strategies[0])[-1:]]
        assert member["malicious_replies"] == (count - 10) and not member["failures"], row
        if count == 12:
            assert member["attack_injected"] in ("alie", "ipm"), row


def test_byzfl_comparison_times_each_rows_own_rule(monkeypatch):
    """The rule floor of benchmarks/byzfl_compare.py aggregates, for every row, with the tensor rule and
    the pre-aggregation steps fedepic's registries build from that row's config, on as many rows as the
    row's rounds have."""
    import importlib.util

    import fedepic.extensions as extensions

    spec = importlib.util.spec_from_file_location("byzfl_compare", REPO / "benchmarks" / "byzfl_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built, real = [], extensions.SERVER_RULES.build

    def recording(name, cfg, context=None):
        rule = real(name, cfg, context)
        calls = []

        def counted(stack, own_index, weights, state):
            calls.append(stack.shape[0])
            return rule(stack, own_index, weights, state)

        built.append((name, type(rule).__name__, cfg, calls))
        return counted

    monkeypatch.setattr(extensions.SERVER_RULES, "build", recording)
    want = {"none_avg": ("fedavg", "MeanRule", 10), "alie_tm": ("fedtrimmedavg", "TrimmedMeanRule", 12),
            "signflip_median": ("fedmedian", "MedianRule", 12),
            "ipm_tm_clip_nnm": ("fedtrimmedavg", "TrimmedMeanRule", 12)}
    assert set(want) == set(module.FEDEPIC_ROWS)
    for row, (name, cls, rows) in want.items():
        assert module.rule_seconds(row, repeats=1) > 0, row
        got_name, got_cls, cfg, calls = built[-1]
        assert (got_name, got_cls, calls) == (name, cls, [rows, rows]), row
        assert list(cfg.defense.pre_aggregation) == (["clip", "nnm"] if row == "ipm_tm_clip_nnm" else []), row


def test_the_flower_backend_holds_each_clients_momentum_and_epic_state(task_identity, monkeypatch):
    """Clients are stateless on Ray: the backend takes a reply's momentum and local EPIC state out of it
    (the strategy never sees them), keeps them in the member's progress as plain data (a checkpoint
    holds a tensor), and sends them with that client's next train message."""
    import threading
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, Message, RecordDict

    import simulations.flower_backend as fb
    from fedepic.server_rounds import Progress
    from simulations.client_app import EPIC_KEY, MOMENTUM_KEY

    cfg = load_config(None, ["mode=federated", "data.name=synthetic", "clients.count=2", "strategies=[fedavg]"])
    sent: list = []

    partition_of = {70: 1, 71: 0}  # node ids in another order than their partitions

    def reply(m: Message) -> Message:
        k = partition_of[int(m.metadata.dst_node_id)]
        return Message(content=RecordDict({
            "arrays": ArrayRecord({"w": torch.zeros(4)}), MOMENTUM_KEY: ArrayRecord({"m": torch.arange(4.0) + k}),
            EPIC_KEY: ConfigRecord({"keep": b"\x80", "rows": 1, "selections": 1}),
            "metrics": MetricRecord({"partition-id": k, "num-examples": 1})}), reply_to=m)

    def answer(grid, messages, timeout_s, stop):
        sent.extend(messages)
        return [reply(m) for m in reversed(messages)]  # replies come back in any order

    monkeypatch.setattr(fb, "exchange", answer)
    grid = fb.PartitionGrid(SimpleNamespace(get_node_ids=lambda: [70, 71]))
    grid.partitions.update(partition_of)
    backend = fb.FlowerServerBackend(cfg, "fedavg", grid, {}, threading.Event(), torch.nn.Linear(4, 1))
    progress = Progress({"w": torch.zeros(4)})
    work = backend.train(1, [0, 1], progress)
    assert [r.client for r in work.replies] == [0, 1] and work.failures == []
    assert all(MOMENTUM_KEY not in m.content.array_records and EPIC_KEY not in m.content.config_records
               for m in backend.valid)
    assert torch.equal(progress.momentum[1], torch.arange(4.0) + 1) and progress.epic[0]["selections"] == 1
    backend.train(2, [1], progress)
    nxt = sent[-1]
    assert int(nxt.metadata.dst_node_id) == 70  # client 1's node
    assert torch.equal(nxt.content.array_records[MOMENTUM_KEY].to_torch_state_dict()["m"], torch.arange(4.0) + 1)
    assert nxt.content.config_records[EPIC_KEY]["rows"] == 1 and nxt.content["config"]["server-round"] == 2
    state = progress.state_dict()
    assert torch.equal(Progress.from_state_dict(state).momentum[1], torch.arange(4.0) + 1)


def test_a_per_step_round_with_ipm_and_clipping_is_the_hand_computed_step(tmp_path, task_identity):
    """Two honest clients and one IPM attacker, every momentum clipped to radius 0.01, the mean:
    w1 = w0 - lr (mean(clip(m_1), clip(m_2), clip(-2 mean(m_1, m_2))) + wd w0), with m_i = (1 - beta) g_i.
    Computed in this process (engine=local)."""
    import threading

    from simulations.server_app import open_run, serve

    cfg = per_step_config(tmp_path, "clients.count=3", "clients.malicious_ids=[2]", "attack.model=ipm",
                          "attack.ipm_eps=2.0", "strategies=[fedavg]", "defense.pre_aggregation=[clip]",
                          "defense.clip_radius=0.01", "rounds=1")
    with open_run(cfg) as life:
        serve(None, cfg, life, threading.Event())
    (record,) = records(life.path, "fedavg")
    data = load_dataset(cfg.data, cfg.seed)
    parts = client_partition(cfg, data)
    model = build_model(cfg, data, cfg.seed, torch.device("cpu"))
    momenta = []
    for k in (0, 1):
        client = build_client_data(cfg, data, k, parts)
        rows = minibatch_rows(len(client), cfg.train.batch_size, client_seed(cfg, k) + 1)
        model.zero_grad()
        F.cross_entropy(model(client.x[rows].float() / 255), client.y[rows]).backward()
        momenta.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * (1 - cfg.train.client_momentum))
    vectors = [*momenta, -2.0 * (momenta[0] + momenta[1]) / 2]
    clipped = [v * min(1.0, 0.01 / float(v.norm())) for v in vectors]
    direction = sum(clipped) / 3
    with torch.no_grad():
        w0 = torch.cat([p.reshape(-1) for p in model.parameters()])
        w1 = w0 - cfg.train.lr * (direction + cfg.server.weight_decay * w0)
        offset = 0
        for p in model.parameters():
            p.copy_(w1[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    ev = evaluate(model, data.test_x, data.test_y, 1024, data.num_classes, False)
    assert record["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    assert record["attack_injected"] == "ipm"
    assert [c["update_norm"] for c in record["clients"]] == pytest.approx([0.01] * 3, rel=1e-4)
