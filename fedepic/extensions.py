"""Every extension point's registry (``fedepic.registry``): peer rules, server strategies (Flower's) and
their tensor server rules, server protocols, model attacks, data attacks, centralized defenses, datasets,
models and the decentralized algorithms. Code outside this module asks an entry's flags and info, never
its name (``tests/test_registry.py`` refuses a registered name compared as a string elsewhere).

To add one, write its module and add one ``Entry`` line below: config validation, the runners, the
generated config reference (docs/reference/config.md) and the tests pick it up from here. Targets are imported only when built, so this
module stays light (no torch, no flwr).

Flags:
- peer rules: ``stateful`` (per-neighbour state kept at the node: records, suspicion history; it lives
  in the rule's ``state``, ``NodeState.rule_state``, which the node checkpoints as any rule's; the flag
  tells config validation and the router, which stands gossip in for such a rule, not the node),
  ``local_epic`` (benign nodes also run EPIC on their own rows), ``benign_graph`` (the router drops
  the malicious nodes from the graph: the upper bound), ``needs_loss`` (the node hands the rule its
  own-minibatch loss, ``state["loss"]``: ``fedepic.peer_node.own_batch_loss``), ``records`` (keeps
  per-neighbour records of what it screens, which ``defense.purification.detector=records`` scores: GP);
  ``info["own_step"]``: the config key that makes a dsgd member of the rule take the rule's own gradient
  step instead of the client-momentum step (MOZI: ``fedepic.algorithms.dsgd.own_step``);
- server strategies: ``reference`` (no Flower: trained in-process, e.g. centralized-epic; no server rule);
- server rules: ``server_update`` (the round engine trains the server's root set each round and hands
  the rule that update, ``fedepic.root_set``; FLTrust; a local-training update: refused under a server
  protocol without ``local_optimizer``);
- server protocols (``server.protocol``): ``local_optimizer`` (clients train ``clients.local_epochs``
  with the local optimiser and send their models; the aggregate is the new model), ``one_step`` (each
  client takes one minibatch gradient at the global model and the server steps w <- w - eta (agg +
  lambda w): ``server.lr``, ``server.weight_decay`` and ``train.sampler`` act; the engines' per-step
  path, ``fedepic.server_rounds.per_step``), ``client_momentum`` (clients send their momenta, the
  client momentum ``train.client_momentum`` acts);
- model attacks: ``needs_honest`` (omniscient: built from the round's honest updates, applied by
  the server or router), the others act on the attacker's own update where it trains;
  ``needs_rule`` (the attack searches against the defense: the server passes its rule, with the
  pre-aggregation steps, as ``aggregator``);
  ``per_receiver`` (decentralized: crafted for each receiver from its model and gossip weights,
  ``fedepic.peer_routing.receiver_view``); ``stateful`` (keeps a memory across rounds: the server's
  ``Progress.attack``, the decentralized engine's member memory, both checkpointed); ``inactive`` (no
  attack: the attacker's update is sent as it is, never run through the attack); ``decentralized_only``,
  ``federated_only`` (refused in the other mode, with ``info["why"]`` in the message); the honest
  updates an attack needs are its function's ``honest_rows`` (``fedepic.attacks.model_attacks``);
- data attacks: ``inactive`` (no data attack), ``poison_set`` (its poisons are a brewed set: brewed per
  trial in mode=centralized, read from ``attack.poisons`` in FL; ``fedepic.attacks.gradient_matching``);
  the other attacks poison drawn rows, their class's ``client_fraction`` of a malicious client's rows in
  FL and its ``central_fraction`` of the training set in mode=centralized;
- centralized defenses: ``epic_selector`` (the member is EPIC itself: ``fedepic.epic.EpicState`` selects,
  at ``defense.epic.fraction`` or the name's ``-F``; the controls replay its drop counts), ``replays_epic``,
  ``once``, ``inactive`` (below, at ``CENTRAL_DEFENSES``);
- datasets: ``folder`` (read from ``<root>/<data.folder>``: classes and image side read from the folder,
  figures titled by the folder), ``generated`` (made from the seed: no files, no decoded cache);
  ``info``: ``classes`` and ``side`` where fixed, ``title`` (the name figures print);
- models: ``running_stats`` (BatchNorm buffers, which DSGT's vectorized gradients cannot carry);
- decentralized algorithms (``decentralized.algorithm``; their equations and papers: ``fedepic.peer_node``):
  ``local_optimizer`` (nodes train ``clients.local_epochs`` with the local optimiser: ``train.momentum``
  and ``train.nesterov`` act), ``one_step`` (one minibatch gradient step per round: ``train.milestones``
  count rounds, ``clients.local_epochs`` stays 1, no augmentation, no local EPIC, no training loss to
  report), ``client_momentum`` (the client momentum ``train.client_momentum`` acts, in the form
  ``train.client_momentum_form``: the EMA or heavy ball; the nodes send their models), ``tracks_gradient`` (nodes exchange (model, tracker) vectors and keep a gradient state: GP can
  purify the trackers; no momentum acts; the tracker needs column-stochastic mixing weights, so
  ``topology.mixing=uniform_degree`` is refused), ``no_running_stats`` (refuses models flagged ``running_stats``).
  Config validation is generated from these flags (``fedepic.config``); the target is the algorithm's
  node step (``fedepic.algorithms``: what one node computes in the ``send`` and ``receive`` halves of a
  round), which both backends call: the in-process engine (``fedepic.peer_local.LocalMember``, or the
  member class named in ``info["member"]``, ``fedepic.peer_stacked.member_class``) and the Ray
  ClientApp (``simulations/dfl_apps.py``), neither of which branches on the algorithm.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

from fedepic.registry import Entry, Registry, config_value


def assumed_byzantine(cfg: Any, context: Mapping[str, Any]) -> int:
    """f, the Byzantine vectors a rule assumes among those it aggregates: ``defense.byzantine``, or (null)
    the configured malicious clients among a receiver's inputs. A server aggregates every client, so
    f = the number of malicious clients (as ByzFL and the papers set it); a peer aggregates its
    neighbourhood, so f = the most malicious neighbours any benign node has in the communication graph
    (the b of He, Karimireddy, Jaggi, "Byzantine-robust decentralized learning via ClippedGossip", 2022),
    not the network's total, which would exceed a small neighbourhood and turn NNM into the identity."""
    if cfg.defense.byzantine is not None:
        return int(cfg.defense.byzantine)
    from fedepic.config import malicious_ids

    bad = tuple(sorted(malicious_ids(cfg)))
    if cfg.mode != "decentralized" or not bad:
        return len(bad)
    topo = cfg.topology
    return most_malicious_neighbours(topo.name, cfg.clients.count, topo.k, topo.p,
                                     tuple(tuple(e) for e in topo.edges), cfg.seed, bad)


@lru_cache(maxsize=16)  # a pure function of its arguments: each node builds its rules from the same graph
def most_malicious_neighbours(name: str, count: int, k: int, p: float, edges: tuple, seed: int, bad: tuple) -> int:
    """The largest number of ``bad`` neighbours of a node outside ``bad`` in the graph ``name``."""
    from fedepic.topology import build_topology

    graph = build_topology("explicit" if name == "edges" else name, count, k=k, p=p, edges=[tuple(e) for e in edges],
                           seed=seed)
    malicious = set(bad)
    return max((sum(j in malicious for j in graph.neighbors(i)) for i in graph.nodes if i not in malicious), default=0)


def expected_clients(cfg: Any) -> int:
    """Clients sampled per round of the server-based mode."""
    return max(int(cfg.clients.count * cfg.clients.fraction_train), 1)


def purification_target(cfg: Any, context: Mapping[str, Any]) -> str:
    """``defense.purification.target``; ``auto`` is the gradient state where the algorithm tracks gradients
    (dsgt), else the weights."""
    target = cfg.defense.purification.target
    if target != "auto":
        return target
    return "gradient" if algorithm_has(cfg, "tracks_gradient") else "weights"


def oracle_round(cfg: Any, context: Mapping[str, Any] | None = None) -> int | None:
    """T_d of oracle detection: ``max(1, ceil(defense.purification.oracle_at * rounds))``, None without."""
    at = cfg.defense.purification.oracle_at
    return None if at is None else max(1, math.ceil(at * cfg.rounds - 1e-9))


def known_malicious(cfg: Any, context: Mapping[str, Any]) -> list[int]:
    """The malicious ids, which only GP's oracle detection (``defense.purification.oracle_round``) reads."""
    from fedepic.config import malicious_ids

    return malicious_ids(cfg)


def bulyan_byzantine(cfg: Any, context: Mapping[str, Any]) -> int:
    """Bulyan's f: the assumed attackers, capped at (n - 3) // 4 of the expected clients (n >= 4f + 3)."""
    return max(0, min(assumed_byzantine(cfg, context), (expected_clients(cfg) - 3) // 4))


def multikrum_selected(cfg: Any, context: Mapping[str, Any]) -> int:
    """Multi-Krum's m: the expected clients less the assumed attackers, at least 1."""
    return max(1, expected_clients(cfg) - assumed_byzantine(cfg, context))


# GP's detector settings, shared by exclude, gp and gp_epic
PURIFICATION: dict[str, Any] = {k: f"defense.purification.{k}" for k in (
    "threshold", "patience", "window", "votes", "min_scale", "cos_weight", "detector", "epic_fraction",
    "epic_threshold", "reject_score", "clip_tau")}
PURIFICATION.update(target=purification_target, oracle_round=oracle_round, known_malicious=known_malicious)


# RFA's keys, one binding for its peer and its server entry
GEOMETRIC_MEDIAN_KEYS = {"iterations": "defense.geometric_median.iterations", "nu": "defense.geometric_median.nu"}

PEER_RULES = Registry("peer rule", [
    Entry("gossip", "strategies.gossip:Gossip", "D-PSGD gossip averaging (Lian et al., NeurIPS 2017)"),
    Entry("median", "strategies.median:MedianRule", "coordinate-wise median (Yin et al., ICML 2018)"),
    Entry("trimmed_mean", "strategies.trimmed_mean:TrimmedMean",
          "coordinate-wise trimmed mean, `defense.trim` per side (Yin et al., ICML 2018)", {"b": "defense.trim"}),
    Entry("krum", "strategies.krum:KrumSelect", "Krum assuming `defense.byzantine` attackers (Blanchard et al., "
          "NeurIPS 2017)", {"f": assumed_byzantine}),
    Entry("scclip", "strategies.scclip:SelfCenteredClipping",
          "self-centred clipping at radius `defense.scclip_tau` (He, Karimireddy, Jaggi, 2022)",
          {"tau": "defense.scclip_tau"}),
    Entry("geometric_median", "strategies.geometric_median:GeometricMedianRule",
          "RFA over own and the neighbours, equal weights, `defense.geometric_median.iterations` and `.nu` "
          "(Pillutla, Kakade, Harchaoui, IEEE TSP 2022)",
          GEOMETRIC_MEDIAN_KEYS),
    Entry("monna", "strategies.monna:MoNNARule", "MoNNA: the mean of the n - f rows nearest to own, f = "
          "`defense.byzantine` (Farhadkhani et al., ICML 2023)", {"f": assumed_byzantine}),
    Entry("epic", "strategies.epic_peer:EpicPeer", "EPIC on the neighbours' updates, then gossip",
          {"fraction": "defense.epic.fraction", "threshold": "defense.epic.threshold"}),
    Entry("exclude", "strategies.exclude:ExcludeDetected",
          "GP's detector, rejecting flagged neighbours each round and confirmed ones for good, no purification",
          PURIFICATION,
          frozenset({"stateful"})),
    Entry("gp", "strategies.gradient_purification:GradientPurification",
          "Gradient Purification (Li, Miao, Zhang, Yin, FCS 2025)",
          PURIFICATION,
          frozenset({"stateful", "records"})),
    Entry("gp_epic", "strategies.gradient_purification:GradientPurification",
          "Gradient Purification, with benign nodes running EPIC on their own rows",
          PURIFICATION,
          frozenset({"stateful", "records", "local_epic"})),
    Entry("upper", "strategies.gossip:Gossip", "gossip on the benign subgraph only (the upper bound)",
          flags=frozenset({"benign_graph"})),
    Entry("balance", "strategies.balance:Balance", "BALANCE: mix with the neighbours within `defense.balance.gamma`"
          " exp(-`defense.balance.kappa` t / T) ||x_i|| (Fang et al., CCS 2024)",
          {"gamma": "defense.balance.gamma", "kappa": "defense.balance.kappa", "alpha": "defense.balance.alpha",
           "rounds": "rounds"}),
    Entry("mozi", "strategies.mozi:Mozi", "MOZI / UBAR: mix with those of the `defense.mozi.rho` closest "
          "neighbours no worse than own on own minibatch (Guo et al., 2020 / TCSVT 2021); `defense.mozi.own_step`: "
          "its own gradient step without momentum (dsgd, as ClippedGossip's code)",
          {"rho": "defense.mozi.rho", "alpha": "defense.mozi.alpha"}, frozenset({"needs_loss"}),
          info={"own_step": "defense.mozi.own_step"}),
])


def own_step_key(cfg: Any, rule: str) -> str | None:
    """The config key (``info["own_step"]``) under which peer rule ``rule`` takes its own gradient step, when
    that key is set in ``cfg``; None otherwise (and for a name that is no peer rule)."""
    key = PEER_RULES.get(rule).info.get("own_step") if rule in PEER_RULES else None
    return key if key is not None and config_value(cfg, key) else None


SERVER_STRATEGIES = Registry("server strategy", [
    Entry("fedavg", "flwr.serverapp.strategy:FedAvg", "FedAvg (McMahan et al., AISTATS 2017), Flower's"),
    Entry("krum", "flwr.serverapp.strategy:Krum", "Krum (Blanchard et al., NeurIPS 2017), Flower's",
          {"num_malicious_nodes": assumed_byzantine}),
    Entry("multikrum", "flwr.serverapp.strategy:MultiKrum", "Multi-Krum averaging n - f, Flower's",
          {"num_malicious_nodes": assumed_byzantine, "num_nodes_to_select": multikrum_selected}),
    Entry("bulyan", "flwr.serverapp.strategy:Bulyan", "Bulyan (El Mhamdi et al., ICML 2018), Flower's; f capped "
          "at (n - 3) // 4", {"num_malicious_nodes": bulyan_byzantine}),
    Entry("fedmedian", "flwr.serverapp.strategy:FedMedian", "coordinate-wise median (Yin et al., ICML 2018), "
          "Flower's"),
    Entry("fedtrimmedavg", "strategies.server:ExactTrimmedAvg", "Flower's trimmed mean cutting exactly "
          "`defense.trim` per side", {"num_trim": "defense.trim"}),
    Entry("epic", "strategies.epic_server:EpicServer", "EPIC on the clients' updates, then FedAvg of the rest",
          {"fraction": "defense.epic.fraction", "threshold": "defense.epic.threshold",
           "min_medoids": "defense.epic.min_medoids", "num_malicious_nodes": assumed_byzantine}),
    Entry("centralized-epic", "simulations.server_app:run_centralized_epic",
          "reference: every client's rows pooled and trained centrally with EPIC", flags=frozenset({"reference"})),
])


# steps over the stacked inputs before a rule (``defense.pre_aggregation``, applied in the order listed)
PRE_AGGREGATION = Registry("pre-aggregation step", [
    Entry("nnm", "strategies.preaggregation:NearestNeighborMixing", "nearest-neighbour mixing assuming "
          "`defense.byzantine` attackers (Allouah et al., AISTATS 2023)", {"f": assumed_byzantine}),
    Entry("clip", "strategies.preaggregation:StaticClip", "static L2 clipping at `defense.clip_radius`",
          {"c": "defense.clip_radius"}),
    Entry("bucketing", "strategies.bucketing:Bucketing", "each input replaced by the mean of its bucket of "
          "`defense.bucket_size`, a seeded random permutation (Karimireddy, He, Jaggi, ICLR 2022)",
          {"s": "defense.bucket_size", "seed": "seed"}),
    Entry("arc", "strategies.arc:AdaptiveRobustClipping", "adaptive robust clipping: the floor(2f(n - f)/n) "
          "largest inputs clipped to the next norm, f = `defense.byzantine` (Allouah et al., 2024)",
          {"f": assumed_byzantine}),
])


def pre_aggregation_steps(cfg: Any, round: int | None = None) -> list:
    """``defense.pre_aggregation``'s steps, in order; ``round`` (the server's round, None at a peer) is the
    context a step may take (bucketing seeds its permutation with it)."""
    context = None if round is None else {"round": round}
    return [PRE_AGGREGATION.build(name, cfg, context) for name in cfg.defense.pre_aggregation]


def is_reference(name: str) -> bool:
    """Whether server member ``name`` is a reference trained without rounds (centralized-epic), not a rule."""
    return name in SERVER_STRATEGIES and SERVER_STRATEGIES.has(name, "reference")


# The tensor rules of the server strategies (strategies/aggregate.py's one signature), name for name
# and bound from the same config keys; references (centralized-epic) have none.
SERVER_RULES = Registry("server rule", [
    Entry("fedavg", "strategies.mean:MeanRule", "FedAvg: the example-weighted mean"),
    Entry("krum", "strategies.krum:KrumRule", "Krum, as Flower's", {"num_malicious_nodes": assumed_byzantine}),
    Entry("multikrum", "strategies.krum:MultiKrumRule", "Multi-Krum averaging n - f, as Flower's",
          {"num_malicious_nodes": assumed_byzantine, "num_nodes_to_select": multikrum_selected}),
    Entry("bulyan", "strategies.bulyan:BulyanRule", "Bulyan, as Flower's; f capped at (n - 3) // 4",
          {"num_malicious_nodes": bulyan_byzantine}),
    Entry("fedmedian", "strategies.median:MedianRule", "coordinate-wise median, as Flower's FedMedian"),
    Entry("fedtrimmedavg", "strategies.trimmed_mean:TrimmedMeanRule", "trimmed mean cutting exactly "
          "`defense.trim` per side", {"num_trim": "defense.trim"}),
    Entry("epic", "strategies.epic_updates:EpicRule", "EPIC on the updates, then FedAvg of the rest",
          {"fraction": "defense.epic.fraction", "threshold": "defense.epic.threshold",
           "min_medoids": "defense.epic.min_medoids", "num_malicious_nodes": assumed_byzantine}),
    Entry("centered_clipping", "strategies.centered_clipping:CenteredClippingRule",
          "centered clipping around the previous aggregate, `defense.centered_clipping.tau` and `.iterations` "
          "(Karimireddy, He, Jaggi, ICML 2021)",
          {"tau": "defense.centered_clipping.tau", "iterations": "defense.centered_clipping.iterations"}),
    Entry("geometric_median", "strategies.geometric_median:GeometricMedianRule",
          "RFA: smoothed Weiszfeld geometric median, example-weighted, `defense.geometric_median.iterations` and "
          "`.nu` (Pillutla, Kakade, Harchaoui, IEEE TSP 2022)",
          GEOMETRIC_MEDIAN_KEYS),
    Entry("monna", "strategies.monna:MoNNARule", "MoNNA: the mean of the n - f updates nearest to the previous "
          "aggregate, f = `defense.byzantine` (Farhadkhani et al., ICML 2023)", {"f": assumed_byzantine}),
    Entry("dnc", "strategies.dnc:DivideAndConquer", "Divide-and-Conquer: drop the c f highest SVD outlier scores "
          "over `defense.dnc.iterations` coordinate subsets (Shejwalkar, Houmansadr, NDSS 2021)",
          {"num_malicious_nodes": assumed_byzantine, "filter_fraction": "defense.dnc.filter_fraction",
           "iterations": "defense.dnc.iterations", "subsample": "defense.dnc.subsample", "seed": "seed"}),
    Entry("signguard", "strategies.signguard:SignGuard", "SignGuard: median-norm band, MeanShift on sign shares, "
          "mean clipped at the median norm (Xu, Huang, Song, Lan, ICDCS 2022)",
          {"lower": "defense.signguard.lower", "upper": "defense.signguard.upper",
           "coordinate_fraction": "defense.signguard.coordinate_fraction", "seed": "seed"}),
    Entry("fltrust", "strategies.fltrust:FLTrust", "FLTrust: ReLU-cosine trust in the server's update on "
          "`defense.fltrust.root_size` clean rows, updates rescaled to its norm (Cao et al., NDSS 2021)",
          flags=frozenset({"server_update"})),
])


# ``server.protocol``: what a federated client computes each round and what the server does with the
# aggregate. The target is the clients' work of a round; both engines ask the flags
# (``fedepic.server_rounds.per_step``), and config validation is generated from them.
SERVER_PROTOCOLS = Registry("server protocol", [
    Entry("local_epochs", "fedepic.client_work:local_train", "each client trains `clients.local_epochs` epochs "
          "from the global model and sends its model; the aggregate is the new global model",
          flags=frozenset({"local_optimizer"})),
    Entry("per_step", "fedepic.client_work:per_step_results", "each client takes one minibatch gradient at the "
          "global model and sends its momentum (`train.client_momentum`); the server steps w <- w - `server.lr` "
          "(agg + `server.weight_decay` w) (Karimireddy, He, Jaggi, ICML 2021; Allouah et al., AISTATS 2023)",
          flags=frozenset({"one_step", "client_momentum"})),
])


def protocol_has(cfg: Any, flag: str) -> bool:
    """Whether the run's ``server.protocol`` is flagged ``flag`` in :data:`SERVER_PROTOCOLS`."""
    return SERVER_PROTOCOLS.has(cfg.server.protocol, flag)


FANG_MODE = "Fang et al.'s attacks are defined against a server's Krum / trimmed mean"

MODEL_ATTACKS = Registry("model attack", [
    Entry("none", "fedepic.attacks.model_attacks:no_attack", "no model attack", flags=frozenset({"inactive"})),
    Entry("sign_flip", "fedepic.attacks.model_attacks:sign_flip", "the negated update"),
    Entry("gaussian", "fedepic.attacks.model_attacks:gaussian", "N(0, `attack.sigma`^2) noise as the update",
          {"sigma": "attack.sigma"}),
    Entry("scaling", "fedepic.attacks.model_attacks:scaling", "the update times `attack.scale` (Bagdasaryan et "
          "al., AISTATS 2020)", {"factor": "attack.scale"}),
    Entry("alie", "fedepic.attacks.model_attacks:alie", "A Little Is Enough (Baruch et al., NeurIPS 2019)",
          {"z": "attack.alie_z"}, frozenset({"needs_honest"})),
    Entry("ipm", "fedepic.attacks.model_attacks:ipm", "inner product manipulation (Xie et al., UAI 2019)",
          {"epsilon": "attack.ipm_eps"}, frozenset({"needs_honest"})),
    Entry("minmax", "fedepic.attacks.model_attacks:minmax", "min-max (Shejwalkar & Houmansadr, NDSS 2021)",
          flags=frozenset({"needs_honest"})),
    Entry("bit_flip", "fedepic.attacks.model_attacks:sign_flip", "bit flipping (Karimireddy, He, Jaggi): the "
          "negated update / model, an alias of `sign_flip`"),
    Entry("minsum", "fedepic.attacks.minsum:minsum", "min-sum (Shejwalkar & Houmansadr, NDSS 2021), the bound of "
          "the authors' code or of the paper's text (`attack.minsum_bound`)", {"bound": "attack.minsum_bound"},
          frozenset({"needs_honest"})),
    Entry("fang_krum", "fedepic.attacks.fang:fang_krum", "Fang et al.'s full-knowledge attack on Krum (USENIX "
          "Security 2020); server FL only", flags=frozenset({"needs_honest", "federated_only"}),
          info={"why": FANG_MODE}),
    Entry("fang_trimmed_mean", "fedepic.attacks.fang:fang_trimmed_mean", "Fang et al.'s full-knowledge attack on "
          "the trimmed mean and median (USENIX Security 2020); server FL only",
          flags=frozenset({"needs_honest", "federated_only"}), info={"why": FANG_MODE}),
    Entry("optimal_alie", "fedepic.attacks.optimized:optimal_alie", "ByzFL's optimized ALIE: tau searched "
          "(`attack.search_evals`) against the defense (Allouah et al., AISTATS 2023)",
          {"evals": "attack.search_evals"}, frozenset({"needs_honest", "needs_rule"})),
    Entry("optimal_ipm", "fedepic.attacks.optimized:optimal_ipm", "ByzFL's optimized IPM: tau searched "
          "(`attack.search_evals`) against the defense (Allouah et al., AISTATS 2023)",
          {"evals": "attack.search_evals"}, frozenset({"needs_honest", "needs_rule"})),
    Entry("mimic", "fedepic.attacks.mimic:mimic", "mimic: copy the honest worker picked in `attack.mimic_warmup` "
          "warm-up rounds (Karimireddy, He, Jaggi, ICLR 2022)", {"warmup": "attack.mimic_warmup"},
          frozenset({"needs_honest", "stateful"})),
    Entry("dissensus", "fedepic.attacks.dissensus:dissensus", "dissensus, decentralized only: each receiver "
          "pulled `attack.dissensus_eps` times against its benign neighbours (He, Karimireddy, Jaggi, 2022)",
          {"epsilon": "attack.dissensus_eps"}, frozenset({"needs_honest", "per_receiver", "decentralized_only"}),
          info={"why": "a decentralized attack (it pulls a peer against its neighbours)"}),
])


DATA_ATTACKS = Registry("data attack", [
    Entry("none", "fedepic.attacks.data_attacks:NoDataAttack", "no data poisoning", flags=frozenset({"inactive"})),
    Entry("label_flip", "fedepic.attacks.data_attacks:LabelFlip", "label flipping (`attack.flip`, `.flip_map`)",
          {"flip": "attack.flip", "flip_map": "attack.flip_map", "budget": "attack.budget"}),
    Entry("backdoor", "fedepic.attacks.data_attacks:Backdoor", "BadNets patch backdoor (Gu et al., 2017)",
          {"label": "attack.backdoor_label", "patch_size": "attack.patch_size",
           "fraction": "attack.backdoor_fraction"}),
    Entry("gradient_matching", "fedepic.attacks.gradient_matching:GradientMatching",
          "Witches' Brew clean-label poisons (Geiping et al., ICLR 2021)", flags=frozenset({"poison_set"})),
])


def spectral_budget(cfg: Any, context: Mapping[str, Any]) -> float:
    """The poison budget spectral signatures expects: ``attack.budget``, within [1/n, 0.5]."""
    return min(max(cfg.attack.budget, 1 / context["n"]), 0.5)


# ``epic`` is the selector itself (flag ``epic_selector``: ``fedepic.epic``); the controls are drop-mask
# functions over the kept rows: ``replays_epic`` ones drop as many rows as EPIC did at the same selection,
# ``once`` ones select once, at EPIC's first selection epoch; ``inactive``: never selects.
CENTRAL_DEFENSES = Registry("centralized defense", [
    Entry("none", "fedepic.defenses:no_drop", "train on every row", flags=frozenset({"inactive"})),
    Entry("epic", "fedepic.epic:EpicState", "EPIC (Yang, Liu, Mirzasoleiman, ICML 2022): drop isolated medoids; "
          "`epic-F` sets the fraction", flags=frozenset({"epic_selector"})),
    Entry("random", "fedepic.defenses:random_drop", "control: as many rows as EPIC dropped, at random",
          flags=frozenset({"replays_epic"})),
    Entry("loss", "fedepic.defenses:highest_loss_drop", "control: as many rows as EPIC dropped, highest loss first",
          flags=frozenset({"replays_epic"})),
    Entry("spectral", "fedepic.defenses:spectral_signatures", "spectral signatures (Tran, Li, Madry, NeurIPS 2018),"
          " once", {"budget": spectral_budget}, frozenset({"once"})),
])


DATASETS = Registry("dataset", [
    Entry("mnist", "fedepic.data:MNIST", "MNIST (torchvision's files)",
          info={"classes": 10, "side": 28, "title": "MNIST"}),
    Entry("fashion_mnist", "fedepic.data:FASHION_MNIST", "FashionMNIST (torchvision's files)",
          info={"classes": 10, "side": 28, "title": "Fashion-MNIST"}),
    Entry("cifar10", "fedepic.data:CIFAR10", "CIFAR-10 (torchvision's files)",
          info={"classes": 10, "side": 32, "title": "CIFAR-10"}),
    Entry("imagefolder", "fedepic.data:IMAGE_FOLDER", "`<root>/<data.folder>/{train,test}/<class>/<image>`; "
          "classes and image side read from the folder", flags=frozenset({"folder"})),
    Entry("synthetic", "fedepic.data:SYNTHETIC", "seeded class prototypes plus noise, 1x28x28, 10 classes (tests)",
          flags=frozenset({"generated"}), info={"classes": 10, "side": 28}),
])


ALGORITHMS = Registry("decentralized algorithm", [
    Entry("dpsgd", "fedepic.algorithms.dpsgd:Dpsgd", "D-PSGD, train then gossip: `clients.local_epochs` of local "
          "training, then the peer rule over the models (Lian et al., NeurIPS 2017)",
          flags=frozenset({"local_optimizer"})),
    Entry("dsgd", "fedepic.algorithms.dsgd:Dsgd", "one-step D-SGD with client momentum "
          "`train.client_momentum`, the per-step protocol (He, Karimireddy, Jaggi, 2022)",
          flags=frozenset({"one_step", "client_momentum", "no_running_stats"}),
          info={"member": "fedepic.peer_stacked:StackedDsgdMember"}),
    Entry("dsgt", "fedepic.algorithms.dsgt:Dsgt", "gradient tracking, one plain step of `train.lr` per round "
          "(DIGing: Nedic, Olshevsky, Shi, SIAM J. Optim. 2017; Pu, Nedic, Math. Prog. 2021)",
          flags=frozenset({"one_step", "tracks_gradient", "no_running_stats"})),
])


def algorithm_has(cfg: Any, flag: str) -> bool:
    """Whether the run's ``decentralized.algorithm`` is flagged ``flag`` in :data:`ALGORITHMS`."""
    return ALGORITHMS.has(cfg.decentralized.algorithm, flag)


MODELS = Registry("model", [
    Entry("resnet18", "fedepic.models:resnet18_body", "torchvision ResNet-18 with a CIFAR stem",
          flags=frozenset({"running_stats"})),
    Entry("cnn", "fedepic.models:cnn_body", "a small CNN (28x28 or 32x32)"),
    Entry("cnn_mnist", "fedepic.models:cnn_mnist_body", "ByzFL's cnn_mnist (two 5x5 convs, 500 hidden)"),
    Entry("mnist_net", "fedepic.models:mnist_net_body", "the MNIST Net of the ClippedGossip and bucketing codes "
          "(two 3x3 convs, dropout, 128 hidden; 1.2M parameters)"),
    Entry("mlp", "fedepic.models:mlp_body", "a two-layer MLP"),
])
