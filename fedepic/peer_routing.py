"""The decentralized network's pure logic: who hears whom, what malicious nodes send, and what is measured.

In ``mode=decentralized`` nobody aggregates centrally; the round engine (``fedepic.peer_rounds``) plays
the network between the nodes' two phases, whatever backend runs them (in process, or Flower on Ray,
whose ServerApp only routes). It knows every vector of the round, which lets it also play the
omniscient attacker (:func:`outgoing`) and the measuring instrument (:func:`round_metrics`).
Everything here works on plain tensors and networkx graphs, so it is tested without Flower.

Model attacks in a decentralized network (He, Karimireddy, Jaggi, "Byzantine-robust decentralized
learning via ClippedGossip", 2022, adapt the server-side attacks this way): a malicious node m sends
a poisoned MODEL in place of its honest trained model. The functions of
``fedepic.attacks.model_attacks`` are applied to model vectors: ``honest`` = the benign models of the
round that the receiver(s) aggregate (each receiver's own trained model and those of its benign
neighbours), ``own`` = m's honest trained model. So sign_flip sends ``-x_m`` (He et al.'s bit
flipping), gaussian a N(0, sigma^2) model, scaling ``scale * x_m``, ALIE ``mu - z sigma`` of the
receivers' honest models (z from Baruch et al. with n = clients.count, f = the malicious count, or
attack.alie_z), IPM ``-eps * mu`` and min-max ``mu + gamma p`` (Shejwalkar & Houmansadr) over them.
By default m sends ONE model to all its benign neighbours, crafted against the union of their
honest neighbourhoods; ``attack.per_neighbour=true`` crafts one model per receiver against exactly
the honest models that receiver aggregates (and draws fresh noise for each). The optimized ALIE / IPM
are always crafted per receiver, against its own defense (:func:`receiver_defense`); mimic keeps its
memory across rounds in the engine (``poisoned_models``'s ``memory``). Colluding malicious
nodes send each other their honest models. Data attacks (label flipping, backdoor) need nothing
here: the malicious node trains on its attacked rows and sends the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import networkx as nx
import torch
from torch import Tensor

from fedepic.attacks.model_attacks import honest_rows_needed, model_attack_arguments, run_model_attack
from fedepic.attacks import flip_table
from fedepic.config import AttackConfig, ConfigError, RunConfig, malicious_ids
from fedepic.extensions import MODEL_ATTACKS, PEER_RULES
from fedepic.metrics import consensus_distance, detection_metrics, nonfinite_model
from fedepic.seeds import peer_attack_seed
from fedepic.topology import build_topology, mixing_weights



# ----------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Routing:
    """Neighbours and mixing weights (``topology.mixing``; Metropolis-Hastings by default) of every node
    for one strategy run.

    ``weights[i][i]`` is node i's self weight and ``weights[i][j]`` its weight for neighbour j.
    """

    graph: nx.Graph
    weights: dict[int, dict[int, float]]

    def neighbours(self, node: int) -> list[int]:
        return sorted(j for j in self.graph.neighbors(node) if j != node)


def routing_for(strategy: str, graph: nx.Graph, malicious: Iterable[int], mixing: str = "metropolis") -> Routing:
    """The communication graph a strategy runs on, with the weights ``mixing`` (``topology.mixing``:
    ``fedepic.topology.mixing_weights``) on it.

    ``upper`` removes every edge between a benign and a malicious node, so benign nodes aggregate
    only benign models, with the weights recomputed on that benign subgraph (the paper's upper bound:
    DFL restarted without the malicious clients). Every other strategy uses ``graph`` as is.
    """
    bad = set(int(m) for m in malicious)
    routed = nx.Graph(graph)
    if PEER_RULES.has(strategy, "benign_graph"):
        routed.remove_edges_from([(u, v) for u, v in graph.edges if (u in bad) != (v in bad)])
    return Routing(routed, mixing_weights(routed, mixing))


def benign_components(routing: Routing, malicious: Iterable[int]) -> int:
    """How many connected pieces the benign nodes form (1 means gossip can reach consensus)."""
    bad = set(malicious)
    benign = [n for n in routing.graph.nodes if n not in bad]
    return nx.number_connected_components(routing.graph.subgraph(benign)) if benign else 0


def malicious_share(graph: nx.Graph, malicious: Iterable[int]) -> float:
    """The largest share of malicious neighbours any benign node has (0.5 or more defeats majority rules)."""
    bad = set(malicious)
    shares = [sum(j in bad for j in graph.neighbors(i)) / graph.degree(i)
              for i in graph.nodes if i not in bad and graph.degree(i) > 0]
    return max(shares, default=0.0)


# ----------------------------------------------------------------------------------- attacks


def honest_reference(graph: nx.Graph, malicious: Iterable[int], receivers: Sequence[int]) -> list[int]:
    """The benign nodes whose models the ``receivers`` aggregate: each receiver and its benign neighbours."""
    bad = set(malicious)
    ref: set[int] = set()
    for i in receivers:
        if i not in bad:
            ref.add(int(i))
        ref.update(int(j) for j in graph.neighbors(i) if j not in bad)
    return sorted(ref)


def attack_generator(seed: int, round_: int, attacker: int, receiver: int) -> torch.Generator:
    """The noise source of one poisoned model: a function of the run seed, round and sender/receiver."""
    return torch.Generator().manual_seed(peer_attack_seed(seed, round_, attacker, receiver))


def _honest_ids(ids: list[int], everyone: list[int], need: int) -> list[int]:
    """``ids``; when fewer than ``need``, all benign nodes (so a thin neighbourhood still works)."""
    chosen = ids if len(ids) >= need else everyone
    if len(chosen) < need:
        raise ValueError(f"model attack needs {need} benign models, the network has {len(chosen)}")
    return chosen


def _honest_stack(trained: Mapping[int, Tensor], ids: list[int], everyone: list[int], need: int) -> Tensor:
    """Rows of :func:`_honest_ids`."""
    return torch.stack([trained[j] for j in _honest_ids(ids, everyone, need)])


def _against(defense: ReceiverDefense, weights: Tensor, receiver: int, stack: Tensor) -> Tensor:
    """The optimized attacks' ``aggregator`` at ``receiver``: its defense over ``stack`` (its view's
    honest rows, then the attack's copies) with the view's ``weights``."""
    return defense(stack, weights.to(stack.dtype), receiver)


def receiver_view(trained: Mapping[int, Tensor], mixing: Mapping[int, Mapping[int, float]], bad: set[int],
                  receiver: int) -> tuple[Tensor, dict[str, Any]]:
    """What a per-receiver attack (flag ``per_receiver``: dissensus) sees of ``receiver``: the models of
    its finite benign neighbours [m, D], and as runtime arguments its model, its gossip weights for those
    neighbours and the sum of its weights for its malicious neighbours."""
    ids = [j for j in sorted(mixing[receiver]) if j != receiver and j not in bad and j in trained
           and bool(torch.isfinite(trained[j]).all())]
    own = trained[receiver]
    honest = torch.stack([trained[j] for j in ids]) if ids else own.new_zeros((0, own.numel()))
    return honest, {"receiver": own, "honest_weights": torch.tensor([mixing[receiver][j] for j in ids]),
                    "byzantine_weight": sum(w for j, w in mixing[receiver].items() if j in bad and j in trained)}


ReceiverDefense = Callable[[Tensor, Tensor, int], Tensor]  # (stack, own first; weights; receiver) -> aggregate


def receiver_defense(cfg: RunConfig, rule: str, round_: int) -> ReceiverDefense:
    """A receiver's defense as the optimized attacks' objective sees it (``fedepic.attacks.optimized``;
    the server's counterpart is ``defense_aggregator``): its peer rule after the pre-aggregation steps,
    built from the registry as a benign node builds it (``peer_node.peer_rule``), over a stack with the
    receiver's own model at row 0 and its mixing weights, with the call context a node gives it in this
    round (``peer_node.rule_context``: round, rounds, node; no ``loss``: the router has no node's data,
    so MOZI scores stage 1 only here). A stateful rule's records (gp, exclude) are the node's, not the
    router's: plain gossip, what they do while no neighbour is flagged, stands in for them."""
    from fedepic.peer_node import STATEFUL, peer_rule
    from strategies.aggregate import aggregate

    built = peer_rule("gossip", cfg, defended=False) if rule in STATEFUL else peer_rule(rule, cfg)

    def defended(stack: Tensor, weights: Tensor, receiver: int) -> Tensor:
        context = {"rounds": int(cfg.rounds), "round": int(round_), "node": int(receiver)}
        return aggregate(built, stack, 0, weights, context).vector

    return defended


def defended_view(trained: Mapping[int, Tensor], mixing: Mapping[int, Mapping[int, float]], bad: set[int],
                  receiver: int) -> Optional[tuple[Tensor, Tensor, int]]:
    """What an optimized attack crafts against at ``receiver``: the honest models it aggregates [k, D]
    (its own first, then its finite benign neighbours), the weights of the stack its rule then gets,
    and f, its malicious neighbours that sent this round (those in ``trained``). The weights are the
    receiving node's (``LocalMember._mixing``, the Ray node's alike): each sender's mixing weight, the
    self weight ``1 - sum over the senders`` (a neighbour that sent nothing leaves its weight to the
    receiver), the f liars' total shared by f equal copies; then, as ``strategies.aggregate`` does
    after leaving out the non-finite honest rows, renormalised to sum to 1. None when its own model is
    not finite (own cannot be row 0).

    >>> one = torch.ones(2)
    >>> mixing = {0: {0: .4, 1: .2, 2: .2, 3: .2}}
    >>> view = defended_view({0: one, 1: one, 2: one}, mixing, {2, 3}, 0)  # liar 3 sent nothing
    >>> view[1].tolist(), view[2]
    ([0.6000000238418579, 0.20000000298023224, 0.20000000298023224], 1)
    """
    own = trained[receiver]
    if not bool(torch.isfinite(own).all()):
        return None
    honest, _ = receiver_view(trained, mixing, bad, receiver)
    ids = [j for j in sorted(mixing[receiver]) if j != receiver and j not in bad and j in trained
           and bool(torch.isfinite(trained[j]).all())]
    senders = [j for j in mixing[receiver] if j != receiver and j in trained]
    liars = [j for j in senders if j in bad]
    w = [1.0 - sum(mixing[receiver][j] for j in senders), *(mixing[receiver][j] for j in ids)]
    w += [sum(mixing[receiver][j] for j in liars) / len(liars)] * len(liars)
    weights = torch.tensor(w, dtype=torch.float64)
    return torch.cat([own.unsqueeze(0), honest]), (weights / weights.sum()).to(own.dtype), len(liars)


def poisoned_models(attack: AttackConfig, trained: Mapping[int, Tensor], graph: nx.Graph,
                    malicious: Sequence[int], attacker: int, *, seed: int, round_: int,
                    weights: Mapping[int, Mapping[int, float]], tally: Optional[AttackTally] = None,
                    defense: Optional[ReceiverDefense] = None, memory: Optional[dict] = None) -> dict[int, Tensor]:
    """What ``attacker`` sends to each of its neighbours: {receiver: model vector}.

    Benign receivers get the poisoned model (one shared tensor, or one per receiver with
    ``attack.per_neighbour``); malicious receivers get the attacker's honest model. ALIE's n and f are
    the graph's nodes and malicious nodes (at least 1). ``tally`` counts the non-finite attack inputs.
    ``weights``: the receivers' mixing weights (``Routing.weights``, ``topology.mixing``'s), which a
    per-receiver attack (dissensus, the optimized ones) reads.
    An attack flagged ``needs_rule`` (optimized ALIE / IPM) given the receivers' ``defense``
    (:func:`receiver_defense`) is crafted per receiver against that receiver's rule over its view
    (:func:`defended_view`; f = its malicious neighbours); a receiver whose view is too thin gets the
    attacker's honest model. A ``stateful`` attack (mimic) keeps its memory in ``memory`` (the member's,
    kept by the engine across rounds and in checkpoints), under the attacker's id (``"a>r"`` per
    receiver with ``attack.per_neighbour``), and gets the honest models' node ids.
    """
    bad = set(int(m) for m in malicious)
    own = trained[attacker]
    receivers = sorted(j for j in graph.neighbors(attacker) if j != attacker)
    out = {j: own for j in receivers if j in bad}
    targets = [j for j in receivers if j not in bad]
    if not targets or MODEL_ATTACKS.has(attack.model, "inactive"):
        out.update({j: own for j in targets})
        return out
    everyone = sorted(n for n in trained if n not in bad)
    params = model_attack_arguments(attack, n=graph.number_of_nodes(), f=max(len(bad), 1))
    need = honest_rows_needed(attack.model, params)
    optimized = defense is not None and MODEL_ATTACKS.has(attack.model, "needs_rule")
    # dissensus: crafted from each receiver's view; optimized ALIE / IPM: against each receiver's defense
    per_receiver = MODEL_ATTACKS.has(attack.model, "per_receiver") or optimized
    mixing = weights if per_receiver else {}
    groups = [[j] for j in targets] if attack.per_neighbour or per_receiver else [targets]
    for group in groups:
        if optimized:
            view = defended_view(trained, mixing, bad, group[0])
            if view is None or view[0].shape[0] < need:
                out[group[0]] = own
                continue
            honest, view_weights, f = view
            aggregator = partial(_against, defense, view_weights, group[0])
            params = model_attack_arguments(attack, n=graph.number_of_nodes(), f=f, aggregator=aggregator)
        elif per_receiver:
            honest, view = receiver_view(trained, mixing, bad, group[0])
            params = model_attack_arguments(attack, n=graph.number_of_nodes(), f=max(len(bad), 1), **view)
        elif memory is not None and MODEL_ATTACKS.has(attack.model, "stateful"):
            ids = _honest_ids(honest_reference(graph, bad, group), everyone, need)
            honest = torch.stack([trained[j] for j in ids])
            key = f"{attacker}>{group[0]}" if attack.per_neighbour else str(attacker)
            params = model_attack_arguments(attack, n=graph.number_of_nodes(), f=max(len(bad), 1),
                                            state=memory.setdefault(key, {}), ids=ids)
        else:
            honest = _honest_stack(trained, honest_reference(graph, bad, group), everyone, need)
        gen = attack_generator(seed, round_, attacker, group[0] if attack.per_neighbour or per_receiver else attacker)
        outcome = run_model_attack(attack.model, honest, own, gen, **params)
        if tally is not None:
            tally.nonfinite_inputs += outcome.nonfinite
        out.update({j: outcome.update for j in group})
    return out


@dataclass
class AttackTally:
    """What the model attacks of one round met: NaN / inf inputs they left out or replaced."""

    nonfinite_inputs: int = 0


def outgoing(attack: AttackConfig, trained: Mapping[int, Tensor], graph: nx.Graph, malicious: Sequence[int],
             *, seed: int, round_: int, weights: Mapping[int, Mapping[int, float]],
             tally: Optional[AttackTally] = None, defense: Optional[ReceiverDefense] = None, memory: Optional[dict] = None) -> dict[int, dict[int, Tensor]]:
    """{sender: {receiver: vector}} for every edge; benign senders send their trained model. ``weights``
    (the receivers' mixing weights), ``defense`` and ``memory``: see :func:`poisoned_models`."""
    bad = set(int(m) for m in malicious)
    sent: dict[int, dict[int, Tensor]] = {}
    for node in graph.nodes:
        if node in bad:
            sent[node] = poisoned_models(attack, trained, graph, sorted(bad), node, seed=seed, round_=round_,
                                         tally=tally, weights=weights, defense=defense, memory=memory)
        else:
            sent[node] = {j: trained[node] for j in graph.neighbors(node) if j != node}
    return sent


def inbox(sent: Mapping[int, Mapping[int, Tensor]], node: int) -> dict[int, Tensor]:
    """What ``node`` receives: {sender: vector}."""
    return {s: msgs[node] for s, msgs in sent.items() if node in msgs}


def message_batches(sizes: Sequence[int], cap_bytes: int) -> list[list[int]]:
    """Split messages (their payload sizes, in order) into consecutive batches of at most ``cap_bytes``.

    A message larger than the cap goes alone. Sending one batch at a time bounds the router's memory
    when models are big (ResNet-18 is 45 MB, a degree-8 node's inbox 360 MB).
    """
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be > 0, got {cap_bytes}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes):
        if current and used + size > cap_bytes:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------- measurement


def label_roles(histograms: Sequence[Sequence[int]], malicious: Iterable[int], flip_table: Optional[Tensor]
                ) -> dict[str, list[int]]:
    """Which labels only benign nodes, only malicious nodes, or both hold (by training rows).

    ``clean`` are labels benign nodes hold that the data attack leaves alone (0-5 in configs/gp_claim.yaml).
    ``exclusive`` are labels that only malicious nodes hold AND that the data attack leaves alone
    (``flip_table[c] == c`` for every c that maps to or from them): their knowledge can reach the
    benign nodes only through the malicious nodes' models (labels 7 and 8 in configs/noniid.yaml).
    """
    bad = set(malicious)
    num_classes = len(histograms[0]) if histograms else 0
    benign_has = [any(h[c] > 0 for n, h in enumerate(histograms) if n not in bad) for c in range(num_classes)]
    bad_has = [any(h[c] > 0 for n, h in enumerate(histograms) if n in bad) for c in range(num_classes)]
    touched: set[int] = set()
    if flip_table is not None:
        for c, d in enumerate(flip_table.tolist()):
            if c != d:
                touched.update((c, int(d)))
    return {
        "benign": [c for c in range(num_classes) if benign_has[c]],
        "malicious_only": [c for c in range(num_classes) if bad_has[c] and not benign_has[c]],
        "exclusive": [c for c in range(num_classes) if bad_has[c] and not benign_has[c] and c not in touched],
        "clean": [c for c in range(num_classes) if benign_has[c] and c not in touched],
    }


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def detection_truth(graph: nx.Graph, malicious: Iterable[int]) -> set[tuple[int, int]]:
    """(benign node, malicious neighbour) pairs: what a perfect detector confirms."""
    bad = set(malicious)
    return {(i, j) for i in graph.nodes if i not in bad for j in graph.neighbors(i) if j in bad}


def divergence_counts(evals: Mapping[int, Mapping[str, Any]], models: Mapping[int, Tensor],
                      benign: Sequence[int]) -> dict[str, int]:
    """This round's ``diverged_nodes``, the benign nodes whose model is non-finite
    (fedepic.metrics.nonfinite_model), and ``collapsed_nodes``, those that predict one class for every
    test image (a divergence when it lasts to the last round: simulations.decentralized.member_summary)."""
    nodes = [i for i in benign if i in models]
    return {"diverged_nodes": sum(nonfinite_model(bool(torch.isfinite(models[i]).all()), evals.get(i))
                                  for i in nodes),
            "collapsed_nodes": sum(bool(evals.get(i, {}).get("collapsed")) for i in nodes)}


def round_metrics(evals: Mapping[int, Mapping[str, Any]], models: Mapping[int, Tensor], benign: Sequence[int],
                  roles: Mapping[str, Sequence[int]], confirmed: Optional[Mapping[int, Sequence[int]]] = None,
                  truth: Optional[set[tuple[int, int]]] = None) -> dict[str, Any]:
    """One round's figures over the BENIGN nodes.

    ``evals[i]`` holds node i's ``accuracy``, ``per_class`` (and optionally ``attack_success``);
    ``models[i]`` its model vector after aggregation; ``confirmed[i]`` the neighbours its detector has
    confirmed (GP / exclude), scored against ``truth`` with ``detection_metrics`` over all
    (node, neighbour) pairs.
    """
    nodes = [i for i in benign if i in evals]
    if not nodes:
        raise ValueError("no benign node reported this round")
    accs = [float(evals[i]["accuracy"]) for i in nodes]
    per_class = torch.tensor([list(evals[i]["per_class"]) for i in nodes], dtype=torch.float64)
    mean_pc = [_mean(per_class[:, c].tolist()) for c in range(per_class.shape[1])]
    record: dict[str, Any] = {
        "mean_accuracy": sum(accs) / len(accs),
        "worst_accuracy": min(accs),
        "benign_label_accuracy": _mean([mean_pc[c] for c in roles.get("benign", [])]),
        "exclusive_accuracy": _mean([mean_pc[c] for c in roles.get("exclusive", [])]),
        "clean_accuracy": _mean([mean_pc[c] for c in roles.get("clean", [])]),
        "per_class": mean_pc,
        "consensus_distance": consensus_distance(torch.stack([models[i] for i in nodes if i in models]))
        if any(i in models for i in nodes) else float("nan"),
    }
    success = [float(evals[i]["attack_success"]) for i in nodes if evals[i].get("attack_success") is not None]
    if success:
        record["attack_success"] = _mean(success)
    record.update(detection_record(nodes, confirmed, truth))
    return record


def detection_record(nodes: Sequence[int], confirmed: Optional[Mapping[int, Sequence[int]]],
                     truth: Optional[set[tuple[int, int]]]) -> dict[str, Any]:
    """``detection_*`` figures of the benign ``nodes``' confirmed sets against ``truth`` (empty without either)."""
    if confirmed is None or truth is None:
        return {}
    detected = {(i, int(j)) for i in nodes for j in confirmed.get(i, [])}
    scored = detection_metrics(detected, {(i, j) for i, j in truth if i in set(nodes)})
    return {f"detection_{k}": v for k, v in scored.items()}


# ----------------------------------------------------------------------------------- the run's graph


def communication_graph(cfg: RunConfig) -> nx.Graph:
    """``fedepic.topology.build_topology`` from the config (a bad graph is a ConfigError naming the key)."""
    topo = cfg.topology
    name = "explicit" if topo.name == "edges" else topo.name
    try:
        return build_topology(name, cfg.clients.count, k=topo.k, p=topo.p,
                              edges=[tuple(e) for e in topo.edges], seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"invalid value {topo.name!r} for key 'topology.name': {err}") from None


def run_label_roles(cfg: RunConfig, histograms: list[list[int]], num_classes: int) -> dict[str, list[int]]:
    """``peer_routing.label_roles`` for this run: only a label-flipping attack touches labels."""
    return label_roles(histograms, malicious_ids(cfg), flip_table(cfg.attack, num_classes))
