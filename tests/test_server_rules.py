"""The tensor server rules (fedepic.extensions.SERVER_RULES) against the Flower strategies of the same name
(SERVER_STRATEGIES): the same replies go through Flower's ``aggregate_train`` and the same stack through
the rule, and the vectors, the kept sets and the shares must agree.

Tolerances: both sides compute in float32 from the same float32 inputs.
- fedmedian, krum: bit-equal (the same order statistic / the chosen row itself).
- fedavg, multikrum, epic (weighted means), fedtrimmedavg, bulyan (means of order statistics):
  rtol 1e-5, atol 1e-6 (values of order 1): only the order of the float32 summations differs.
- kept sets and shares: equal. The Krum scores are float64 here, float32 in Flower; the stacks below
  keep the score gaps far above Flower's float32 error (see test_flower_float32_krum_is_the_exact_selection).
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch

from fedepic.extensions import SERVER_RULES, SERVER_STRATEGIES
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum
from strategies.aggregate import aggregate
from strategies.epic_server import record_vector
from strategies.server import exact_trim_beta, flower_settings

NAMES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "epic"]
RTOL, ATOL = 1e-5, 1e-6
BIT_EQUAL = {"fedmedian", "krum"}


def fl_cfg(clients: int, f: int):
    from fedepic.config import load_config

    return load_config(None, ["mode=federated", f"clients.count={clients}", f"defense.byzantine={f}",
                              f"defense.trim={f}"])


def reply(vector: np.ndarray, client_id: int, examples: int) -> Message:
    """Two arrays of different shapes ("w" [3, 100] then "b"), so the flattening order is exercised."""
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.from_numpy(vector[:300].reshape(3, 100).copy()),
                               "b": torch.from_numpy(vector[300:].copy())}),
        "metrics": MetricRecord({"num-examples": examples, "partition-id": client_id}),
    })
    return Message(content=content, dst_node_id=client_id + 100, message_type="train")


def make_stack(n: int, d: int, seed: int, offset: float = 0.0, outliers: tuple[int, ...] = ()) -> np.ndarray:
    """n float32 rows: a common direction plus noise (client updates), shifted by a random model when
    ``offset`` (client models), with the rows ``outliers`` boosted."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(d, generator=gen) + 0.3 * torch.randn(n, d, generator=gen)
    for k, i in enumerate(outliers):
        rows[i] = (8.0 + 3 * k) * rows[i] if k % 2 == 0 else rows[i] + 5.0
    rows += offset * torch.randn(d, generator=gen)
    return rows.numpy().astype(np.float32)


def examples_for(n: int, seed: int) -> list[int]:
    return torch.randint(5, 60, (n,), generator=torch.Generator().manual_seed(seed + 1000)).tolist()


def trimmed_shares(stack: torch.Tensor, beta: float) -> list[float]:
    """Reference (numpy, by the definition): per row of [n, D], the share of coordinates whose value lies
    in the beta-trimmed tails, below the int(beta*n)-th smallest or above the int(beta*n)-th largest
    value of the column (ties with those count as kept)."""
    n = stack.shape[0]
    cut = int(beta * n)
    if cut == 0 or n == 0:
        return [0.0] * n
    x = stack.numpy()
    ordered = np.sort(x, axis=0)
    return ((x < ordered[cut]) | (x > ordered[n - cut - 1])).mean(axis=1).tolist()


def closest_shares(stack: torch.Tensor, beta: int) -> list[float]:
    """Reference (numpy, by the definition): Bulyan's second step, per row of [t, D] the share of
    coordinates where the row is not among the beta values closest to np.median's median (ties count
    as kept)."""
    t = stack.shape[0]
    if t == 0 or beta >= t:
        return [0.0] * t
    x = stack.numpy()
    gap = np.abs(x - np.median(x, axis=0))
    limit = np.sort(gap, axis=0)[max(beta, 1) - 1]
    return (gap > limit).mean(axis=1).tolist()


def flower_run(name: str, cfg, stack: np.ndarray, examples: list[int]):
    """Flower's strategy `name` on fresh replies: (vector, kept or None, shares or None) as Flower's own
    functions define them (select_multikrum for Krum and Bulyan's first step, EpicServer's record,
    the tail and closest shares below for the trimmed mean, the median and Bulyan's second step)."""
    n = stack.shape[0]
    selected: list = []

    def recording(contents, f, m):
        selected[:] = select_multikrum(contents, f, m)
        return list(selected)

    context = flower_settings(cfg)
    if name == "bulyan":
        context["selection_rule"] = recording
    strategy = SERVER_STRATEGIES.build(name, cfg, context)
    replies = [reply(stack[i], i, examples[i]) for i in range(n)]
    contents = [m.content for m in replies]
    order = {id(c): i for i, c in enumerate(contents)}
    kept = shares = None
    if name in ("krum", "multikrum"):
        chosen = {order[id(c)] for c in select_multikrum(contents, strategy.num_malicious_nodes,
                                                          strategy.num_nodes_to_select)}
        kept = [i in chosen for i in range(n)]
    arrays, _ = strategy.aggregate_train(1, replies)
    if name == "fedavg":
        kept = [True] * n
    elif name == "bulyan" and selected:
        rows = sorted(order[id(c)] for c in selected)
        kept = [i in rows for i in range(n)]
        shares = [1.0] * n
        beta = len(rows) - 2 * strategy.num_malicious_nodes
        for i, share in zip(rows, closest_shares(torch.from_numpy(stack[rows]), beta)):
            shares[i] = share
    elif name == "epic":
        kept = [i not in strategy.dropped_history[1] for i in range(n)]
    elif name == "fedtrimmedavg":
        kept, shares = [True] * n, trimmed_shares(torch.from_numpy(stack), strategy.beta_for(n))
    elif name == "fedmedian":
        kept, shares = [True] * n, trimmed_shares(torch.from_numpy(stack), exact_trim_beta(n, (n - 1) // 2))
    return (None if arrays is None else record_vector(arrays).numpy()), kept, shares


def check_equal(name: str, cfg, stack: np.ndarray, examples: list[int]) -> None:
    vector, kept, shares = flower_run(name, cfg, stack, examples)
    rule = SERVER_RULES.build(name, cfg)
    out = aggregate(rule, torch.from_numpy(stack.copy()), None, torch.tensor(examples, dtype=torch.float64))
    if vector is None:
        assert out.vector is None and not out.kept.any(), name
        return
    if name in BIT_EQUAL:
        np.testing.assert_array_equal(out.vector.numpy(), vector, err_msg=name)
    else:
        np.testing.assert_allclose(out.vector.numpy(), vector, rtol=RTOL, atol=ATOL, err_msg=name)
    assert out.kept.tolist() == kept, name
    if shares is not None:
        assert out.shares.tolist() == shares, name
    assert not out.nonfinite.any()


CASES = [(5, 400, 1), (7, 400, 1), (8, 1000, 1), (11, 1000, 2), (12, 2000, 2), (16, 1000, 3), (20, 700, 4)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,d,f", CASES)
def test_random_stacks_give_flowers_result(task_identity, name, n, d, f):
    cfg = fl_cfg(n, f)
    check_equal(name, cfg, make_stack(n, d, seed=n * 31 + d), examples_for(n, n))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,f,outliers", [(9, 2, (1, 6)), (12, 2, (0, 11)), (15, 3, (2, 7, 13))])
def test_models_with_planted_outliers_give_flowers_result(task_identity, name, n, f, outliers):
    """Model-like rows (a large common offset) with boosted and shifted attackers."""
    cfg = fl_cfg(n, f)
    stack = make_stack(n, 1200, seed=n, offset=2.0, outliers=outliers)
    check_equal(name, cfg, stack, examples_for(n, n + 1))
    if name in ("krum", "multikrum", "bulyan", "epic"):
        out = SERVER_RULES.build(name, cfg)(torch.from_numpy(stack), None, None, {})
        assert not any(out.kept[i] for i in outliers), name


def test_fedavg_weights_the_example_counts_and_equal_weights_without(task_identity):
    stack = make_stack(6, 500, seed=3)
    examples = [1, 100, 3, 50, 7, 9]
    check_equal("fedavg", fl_cfg(6, 0), stack, examples)
    rule = SERVER_RULES.build("fedavg", fl_cfg(6, 0))
    np.testing.assert_allclose(rule(torch.from_numpy(stack), None, None, {}).vector.numpy(), stack.mean(axis=0),
                               rtol=RTOL, atol=ATOL)


def test_bulyan_with_too_few_rows_skips_like_flower(task_identity):
    cfg = fl_cfg(11, 2)  # the config allows f = 2 for 11 clients; 9 replies need 4 * 2 + 3 = 11
    check_equal("bulyan", cfg, make_stack(9, 400, seed=4), [10] * 9)


@pytest.mark.parametrize("name", NAMES)
def test_updates_give_the_models_result_minus_the_global_model(task_identity, name):
    """The rules are translation-equivariant: on updates (models - global) they return Flower's aggregated
    model minus the global model, and keep the same rows."""
    n, f = 12, 2
    cfg = fl_cfg(n, f)
    gen = torch.Generator().manual_seed(5)
    global_model = torch.randn(900, generator=gen)
    updates = torch.randn(900, generator=gen) * 0.5 + 0.2 * torch.randn(n, 900, generator=gen)
    updates[3] *= 10
    models = (global_model + updates).numpy()
    examples = examples_for(n, 5)
    vector, kept, _ = flower_run(name, cfg, models, examples)
    rule = SERVER_RULES.build(name, cfg)
    out = rule(torch.from_numpy(models) - global_model, None, torch.tensor(examples, dtype=torch.float64), {})
    np.testing.assert_allclose(out.vector.numpy(), vector - global_model.numpy(), rtol=RTOL, atol=1e-5)
    assert out.kept.tolist() == kept


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_rows_are_handled_as_the_tracked_strategy_handles_them(task_identity, name):
    """aggregate() leaves NaN / inf rows out as TrackedStrategy.aggregate does: same arrays, excluded and
    shares (a row left out: excluded, share 1.0) and the same nonfinite flags."""
    from strategies.server import build_server_strategy

    n, f = 12, 1
    cfg = fl_cfg(n, f)
    stack = make_stack(n, 500, seed=6, outliers=(4,))
    stack[2, 17] = np.nan
    stack[9, 400] = np.inf
    examples = examples_for(n, 6)
    tracked = build_server_strategy(name, cfg)
    outcome = tracked.aggregate(1, [reply(stack[i], i, examples[i]) for i in range(n)], torch.from_numpy(stack.copy()))
    out = aggregate(SERVER_RULES.build(name, cfg), torch.from_numpy(stack.copy()), None,
                    torch.tensor(examples, dtype=torch.float64))
    assert out.nonfinite.tolist() == outcome.nonfinite
    np.testing.assert_allclose(out.vector.numpy(), record_vector(outcome.arrays).numpy(), rtol=RTOL, atol=ATOL)
    excluded = outcome.excluded if outcome.excluded is not None else [False] * n
    assert out.excluded == excluded
    if outcome.trimmed_share is not None:
        assert out.shares.tolist() == outcome.trimmed_share
    assert out.excluded[2] and out.excluded[9]


def test_flower_float32_krum_is_the_exact_selection(task_identity):
    """Model-like rows (weights of std 0.05, client updates of 1e-2): Flower's float32 |a|^2 + |b|^2 - 2ab
    still resolves the score gaps, and Flower on float64 copies of the same rows (no cancellation)
    selects what the rule selects. (With updates of 1e-3 over 431k coordinates Flower's float32 scores
    err more than the honest clients' score gaps, and its selection is rounding noise there.)"""
    n, f = 12, 2
    gen = torch.Generator().manual_seed(7)
    d = 50_000
    models = (0.05 * torch.randn(d, generator=gen) + 1e-2 * (torch.randn(d, generator=gen)
                                                             + torch.randn(n, d, generator=gen))).numpy()
    for name in ("krum", "multikrum"):
        cfg = fl_cfg(n, f)
        out = SERVER_RULES.build(name, cfg)(torch.from_numpy(models), None, None, {})
        for dtype in (np.float32, np.float64):
            _, kept, _ = flower_run(name, cfg, models.astype(dtype), [10] * n)
            assert out.kept.tolist() == kept, (name, dtype)


@pytest.mark.parametrize("module", ["strategies.mean", "strategies.median", "strategies.trimmed_mean",
                                    "strategies.krum", "strategies.bulyan", "strategies.epic_updates"])
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_tracked_strategy_reports_the_rule_and_warns_when_flower_averaged_otherwise(task_identity, caplog):
    """TrackedStrategy's report is its rule's, whatever its name; a rule whose vector is not Flower's is
    logged (a report that may not be Flower's selection)."""
    from strategies.median import MedianRule
    from strategies.server import TrackedStrategy, build_server_strategy

    n, cfg = 10, fl_cfg(10, 2)
    stack = make_stack(n, 500, seed=8, outliers=(3,))
    replies = lambda: [reply(stack[i], i, 10) for i in range(n)]  # noqa: E731 (fresh replies per strategy)
    krum = build_server_strategy("krum", cfg)
    renamed = TrackedStrategy("not-a-registered-name", krum.strategy, krum.rule)
    outcome = renamed.aggregate(1, replies(), torch.from_numpy(stack.copy()))
    assert outcome.excluded == SERVER_RULES.build("krum", cfg)(torch.from_numpy(stack), None, None, {}).excluded
    median = build_server_strategy("fedmedian", cfg).aggregate(1, replies(), torch.from_numpy(stack.copy()))
    assert median.excluded is None and median.trimmed_share[3] > 0.95  # coordinate-wise: shares only
    with caplog.at_level("WARNING", logger="fedepic"):
        mixed = TrackedStrategy("fedavg", build_server_strategy("fedavg", cfg).strategy, MedianRule())
        mixed.aggregate(1, replies(), torch.from_numpy(stack.copy()))
    assert "differs from Flower's arrays" in caplog.text


def test_a_rule_registered_only_as_a_tensor_rule_runs_on_both_engines(tmp_path, task_identity, monkeypatch):
    """One module plus one SERVER_RULES line: the config accepts the name, engine=local aggregates with
    it, and the Flower backend (engine=ray) aggregates with the same tensor rule, since Flower has no
    strategy of that name."""
    import threading
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    import simulations.flower_backend as fb
    from fedepic import extensions
    from fedepic.config import load_config
    from fedepic.registry import Entry
    from fedepic.server_rounds import Progress
    from tests.test_resume import serve_locally

    entries = dict(extensions.SERVER_RULES._entries)
    entries["plain_mean"] = Entry("plain_mean", "strategies.mean:MeanRule", "the mean, under another name")
    monkeypatch.setattr(extensions.SERVER_RULES, "_entries", entries)
    cfg = load_config(None, ["mode=federated", "engine=local", "name=n", f"output_dir={tmp_path}", "progress=false",
                             "data.name=synthetic", "data.synthetic_train=200", "data.synthetic_test=50",
                             "clients.count=3", "rounds=2", "model.name=mlp", "strategies=[plain_mean,fedavg]"])
    folder = serve_locally(cfg)
    rows = {r["strategy"]: r for r in json.loads((folder / "summary.json").read_text())["rows"]}
    assert rows["plain_mean"]["final_accuracy"] == pytest.approx(rows["fedavg"]["final_accuracy"])

    def answer(grid, messages, timeout_s, stop):
        return [Message(content=RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), float(k))}),
                                            "metrics": MetricRecord({"partition-id": k, "num-examples": 1})}),
                        reply_to=m) for k, m in enumerate(messages)]

    monkeypatch.setattr(fb, "exchange", answer)
    grid = fb.PartitionGrid(SimpleNamespace(get_node_ids=lambda: [7, 8]))
    grid.partitions.update({7: 0, 8: 1})
    model = torch.nn.Linear(2, 1, bias=False)  # one parameter entry of 2 values, like the replies' "w"
    backend = fb.FlowerServerBackend(cfg, "plain_mean", grid, {}, threading.Event(), model)
    assert backend.tracked is None
    progress = Progress({"weight": torch.zeros(1, 2)})
    work = backend.train(1, [0, 1], progress)
    out = backend.aggregate(1, work, torch.stack([r.vector for r in work.replies]))
    assert torch.equal(out.vector, torch.full((2,), 0.5)) and out.excluded == [False, False]


def _batchnorm_round(n: int = 7):
    """A model with BatchNorm running statistics and an integer counter, its state, and n replies whose
    parameters are honest but whose last row's running statistics are far off."""
    from fedepic.server_rounds import ClientReply, NodeWork
    from fedepic.vectors import flatten_state, parameter_mask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    like = {k: v.clone() for k, v in model.state_dict().items()}
    mask = parameter_mask(model, like)
    origin = flatten_state(like)
    stack = origin + 0.01 * torch.randn(n, origin.numel(), generator=torch.Generator().manual_seed(1))
    stack[n - 1, ~mask] += 50.0
    work = NodeWork([ClientReply(i, stack[i], {"num-examples": 10}) for i in range(n)], [], n)
    return model, like, mask, origin, stack, work


def _flower_aggregate(name, cfg, model, work, updates):
    import threading
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MessageType

    import simulations.flower_backend as fb

    n = len(work.replies)
    grid = fb.PartitionGrid(SimpleNamespace(get_node_ids=lambda: list(range(n))))
    backend = fb.FlowerServerBackend(cfg, name, grid, {}, threading.Event(), model)
    asks = [Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=i, message_type=MessageType.TRAIN)
            for i in range(n)]
    backend.valid = [Message(content=RecordDict({"arrays": ArrayRecord({}), "metrics": MetricRecord(
        {"num-examples": 10, "partition-id": i})}), reply_to=a) for i, a in enumerate(asks)]
    return backend.aggregate(1, work, updates.clone())


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "epic"])
def test_both_backends_aggregate_a_batchnorm_model_alike(task_identity, name):
    """Rules see parameter updates only, on both backends (integer counters and running statistics never
    reach Flower); the running statistics are the mean of the rows the rule kept, written once by the
    engine; one client's far-off statistics move neither the kept set nor the parameters."""
    from fedepic.config import load_config
    from fedepic.local_backend import RuleAggregation
    from fedepic.server_rounds import fixed_mask, new_vector, parameter_updates

    cfg = load_config(None, ["mode=federated", "clients.count=7", "clients.malicious_ids=[6]", f"strategies=[{name}]"])
    model, like, mask, origin, stack, work = _batchnorm_round()
    updates = parameter_updates(stack, origin, mask)
    assert updates.shape == (7, int(mask.sum()))
    local = RuleAggregation(cfg, name)(work, updates.clone())
    ray = _flower_aggregate(name, cfg, model, work, updates)
    assert local.excluded == ray.excluded and local.nonfinite == ray.nonfinite
    assert torch.allclose(local.vector, ray.vector, atol=1e-6)
    vector = new_vector(origin, local, stack, mask, fixed_mask(like), work)
    statistics = ~mask
    kept = [i for i in range(7) if not (local.excluded or [False] * 7)[i]]
    assert torch.allclose(vector[statistics], stack[kept][:, statistics].mean(dim=0), atol=1e-5)
    clean = _batchnorm_round()[4][:6]  # the same parameters without the far-off statistics
    clean_work = type(work)(work.replies[:6] + [work.replies[6]], [], 7)
    assert clean_work.asked == 7 and torch.equal(updates[:6], parameter_updates(clean, origin, mask))


@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "krum"])
def test_a_reply_with_nan_running_statistics_is_left_out_on_both_backends(task_identity, name):
    from fedepic.config import load_config
    from fedepic.local_backend import RuleAggregation
    from fedepic.server_rounds import parameter_updates

    cfg = load_config(None, ["mode=federated", "clients.count=7", "clients.malicious_ids=[6]", f"strategies=[{name}]"])
    model, like, mask, origin, stack, work = _batchnorm_round()
    stack[2, ~mask] = float("nan")  # finite parameters, NaN statistics
    updates = parameter_updates(stack, origin, mask)
    local = RuleAggregation(cfg, name)(work, updates.clone())
    ray = _flower_aggregate(name, cfg, model, work, updates)
    assert local.nonfinite[2] and ray.nonfinite[2] and local.nonfinite == ray.nonfinite
    assert torch.isfinite(local.vector).all() and torch.allclose(local.vector, ray.vector, atol=1e-6)
