"""``train.sampler``: which rows make the minibatches of the one-step protocols (fedepic/minibatches.py),
the same on every path that draws them (the per-node step a Ray node runs, the in-process rows, the
per-step server clients), and refused with one line where no one-step gradient is taken."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from fedepic import minibatches
from fedepic.client_data import ClientData
from fedepic.client_work import client_batch_rows, minibatch_rows
from fedepic.config import load_config
from fedepic.errors import ConfigError
from fedepic.minibatches import in_order_rows, minibatch_positions, with_replacement_rows
from fedepic.peer_node import dsgt_batch, node_batch
from fedepic.seeds import derive_seed


def test_the_module_doctests_pass():
    result = doctest.testmod(minibatches)
    assert result.failed == 0 and result.attempted > 0


def test_in_order_batches_wrap_around_the_stored_rows():
    """n = 5 rows, B = 2: the rows repeated without end and cut in twos."""
    got = [in_order_rows(5, 2, t).tolist() for t in range(6)]
    assert got == [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4], [0, 1]]
    # a batch larger than the node's rows wraps inside the batch
    assert in_order_rows(3, 7, 0).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_batches_per_epoch_starts_the_order_over():
    """K = 3 batches of 4 out of 20 rows: rows 0-11 in every epoch, rows 12-19 never (an unshuffled
    loader stopped after K batches: ClippedGossip's fixed 960 rows)."""
    got = [in_order_rows(20, 4, t, batches_per_epoch=3).tolist() for t in range(7)]
    epoch = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert got == epoch + epoch + epoch[:1]
    # K = n // B is one drop_last epoch of an unshuffled loader: row 4 of 5 is never used
    assert [in_order_rows(5, 2, t, batches_per_epoch=2).tolist() for t in range(4)] == [[0, 1], [2, 3]] * 2


def test_replacement_is_the_seeded_draw_it_always_was():
    for seed in (0, 7, 2**40):
        want = torch.randint(50, (8,), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(with_replacement_rows(50, 8, seed), want)
        assert torch.equal(minibatch_rows(50, 8, seed), want)
        assert torch.equal(minibatch_positions("replacement", 50, 8, seed, step=3), want)


def test_samplers_refuse_a_node_without_rows_and_unknown_names():
    with pytest.raises(ValueError, match="at least one training row"):
        in_order_rows(0, 2, 0)
    with pytest.raises(ValueError, match="numbered from 0"):
        in_order_rows(4, 2, -1)
    with pytest.raises(ValueError, match="unknown train.sampler"):
        minibatch_positions("shuffle", 4, 2, 0, 0)


def dsgd_config(*extra: str):
    return load_config("dfl_smoke", ["engine=local", "decentralized.algorithm=dsgd", "train.batch_size=3",
                                     "train.client_momentum=0.9", *extra])


def test_node_batches_follow_the_sampler_and_the_algorithms_first_round():
    """Hand-made rows whose images hold their own index: dsgd's round r takes in-order batch r - 1,
    dsgt's round r batch r (its y_i(0) is round 0); under replacement the seeded draw of
    (seed, round, node), as before."""
    x = torch.arange(7).reshape(7, 1, 1, 1).to(torch.uint8) * 10
    y = torch.arange(7)
    cfg = dsgd_config("train.sampler=in_order")
    assert [node_batch(x, y, cfg, r, node=4)[1].tolist() for r in (1, 2, 3)] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]
    assert node_batch(x, y, cfg, 2, node=4)[0].flatten().tolist() == [30, 40, 50]
    assert [node_batch(x, y, cfg, r, 4, first_round=0)[1].tolist() for r in (0, 1)] == [[0, 1, 2], [3, 4, 5]]
    cfg = dsgd_config("train.sampler=in_order", "train.batches_per_epoch=2")
    assert [node_batch(x, y, cfg, r, node=0)[1].tolist() for r in (1, 2, 3, 4)] == [[0, 1, 2], [3, 4, 5]] * 2
    cfg = dsgd_config()
    assert cfg.train.sampler == "replacement"
    want = dsgt_batch(x, y, cfg, derive_seed(cfg.seed, 5, 2))
    got = node_batch(x, y, cfg, 5, node=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_in_process_members_draw_the_per_node_batches():
    """The in-process members (``LocalMember._batch``, which the stacked dsgd rows and dsgt's all-nodes
    forms call) take node i's in-order batch from its own rows, as the per-node step does."""
    from tests.test_algorithm_steps import member_args
    from fedepic.peer_stacked import StackedDsgdMember

    cfg = dsgd_config("train.sampler=in_order", "train.batches_per_epoch=4")
    member = StackedDsgdMember(cfg, "gossip", "gossip", *member_args(cfg, "gossip"))
    for i in (0, 3):
        client = member.clients[i]
        for round_ in (1, 2, 5, 6):
            step = (round_ - 1) % 4
            images, labels = member._batch(i, round_)
            assert torch.equal(labels, client.y[[3 * step, 3 * step + 1, 3 * step + 2]])
            assert torch.equal(images, client.x[3 * step:3 * step + 3])


def test_per_step_clients_take_their_in_order_batch_of_the_round(monkeypatch):
    """server.protocol=per_step: server round r takes batch r - 1 of each client's rows (the images the
    vectorized gradient receives, captured)."""
    import fedepic.client_work as client_work
    from fedepic.builders import build_model
    from fedepic.data import load_dataset

    cfg = load_config("dfl_smoke", ["mode=federated", "server.protocol=per_step", "strategies=[fedavg]",
                                    "train.batch_size=4", "train.sampler=in_order",
                                    "clients.malicious_ids=[]", "attack.data=none"])
    assert client_batch_rows(cfg, 10, seed=1, server_round=3).tolist() == [8, 9, 0, 1]
    data = load_dataset(cfg.data, cfg.seed)
    clients = [ClientData(k, np.arange(6) + 10 * k, data.train_x[10 * k:10 * k + 6], data.train_y[10 * k:10 * k + 6],
                          torch.zeros(6, dtype=torch.bool), False) for k in range(2)]
    seen = []
    real = client_work.gradients_in_state_layout
    monkeypatch.setattr(client_work, "gradients_in_state_layout",
                        lambda model, state, base, xb, yb, **kw: seen.append(yb) or real(model, state, base, xb, yb, **kw))
    model = build_model(cfg, data)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client_work.per_step_results(cfg, model, clients, state, 2, [None, None], client_work.state_parameters(model))
    want = torch.stack([c.y[[4, 5, 0, 1]] for c in clients])
    assert torch.equal(seen[0], want)


@pytest.mark.parametrize("overrides, key, message", [
    (["decentralized.algorithm=dpsgd", "train.sampler=in_order"], "train.sampler", "no one-step gradients"),
    (["decentralized.algorithm=dpsgd", "train.batches_per_epoch=3"], "train.batches_per_epoch", "no one-step"),
    (["mode=federated", "strategies=[fedavg]", "train.sampler=in_order"], "train.sampler",
     "server.protocol=local_epochs takes no one-step"),
    (["decentralized.algorithm=dsgd", "train.batches_per_epoch=3"], "train.batches_per_epoch",
     "only under train.sampler=in_order"),
    (["decentralized.algorithm=dsgd", "train.sampler=shuffle"], "train.sampler", "replacement, in_order"),
    (["decentralized.algorithm=dsgd", "strategies=[fast]", "variants={fast: {strategy: gossip, train: "
      "{sampler: in_order}}}"], "variants.fast.train.sampler", "the same for every member"),
])
def test_the_sampler_keys_are_refused_where_they_do_not_act(overrides, key, message):
    with pytest.raises(ConfigError, match=f"'{key}'.*{message}"):
        load_config("dfl_smoke", overrides)


def test_the_sampler_keys_are_accepted_where_they_act():
    for overrides in (["decentralized.algorithm=dsgd"], ["decentralized.algorithm=dsgt"],
                      ["mode=federated", "server.protocol=per_step", "strategies=[fedavg]"]):
        cfg = load_config("dfl_smoke", [*overrides, "train.sampler=in_order", "train.batches_per_epoch=30"])
        assert (cfg.train.sampler, cfg.train.batches_per_epoch) == ("in_order", 30)


def test_the_client_app_draws_the_in_process_batches(monkeypatch):
    """dsgd under train.sampler=in_order through the Ray backend's code (``Router`` -> ``FlowerPeers`` ->
    the ClientApp, on an in-process grid) and through the in-process stacked rows: the same records;
    and not those of the replacement sampler (the key reaches both engines)."""
    from flwr.supercore.task_identity import TaskIdentity
    from simulations.dfl_apps import Router, make_client_app
    from fedepic.config import malicious_ids
    from fedepic.peer_local import _Collect, run_sequential
    from fedepic.peer_rounds import Member
    from fedepic.peer_routing import communication_graph, routing_for
    from tests.test_algorithm_steps import InProcessGrid, member_args, same_records

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in a ServerApp's process
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = dsgd_config("train.sampler=in_order", "train.batches_per_epoch=2", "rounds=3", "strategies=[gossip]",
                      "train.eval_every=1", "train.lr=0.05")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both halves in one process: the same float sums
    try:
        want = run_sequential(cfg, "gossip")
        other = run_sequential(dsgd_config("rounds=3", "strategies=[gossip]", "train.eval_every=1", "train.lr=0.05"),
                               "gossip")
        _, _, _, roles = member_args(cfg, "gossip")
        member = Member("gossip", "gossip", routing_for("gossip", communication_graph(cfg), malicious_ids(cfg),
                                                        cfg.topology.mixing))
        sink = _Collect()
        Router(cfg, roles, [member], sink)(InProcessGrid(make_client_app(cfg), cfg.clients.count), None)
    finally:
        torch.set_num_threads(threads)
    assert [r["round"] for r in sink.records] == [1, 2, 3]
    for record, expected in zip(sink.records, want):
        same_records(expected, {k: v for k, v in record.items() if k not in ("node_train_seconds",
                                                                               "train_phase_seconds")})
    assert [r["consensus_distance"] for r in want] != pytest.approx([r["consensus_distance"] for r in other], rel=1e-3)
