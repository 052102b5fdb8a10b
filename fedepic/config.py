"""Typed run configuration: OmegaConf structured configs from dataclasses, YAML loading and validation.

Every key has a documented default here; `configs/*.yaml` only set what differs. `load_config` is the
one place that turns user input into a validated config, and every problem it finds is raised as a
`ConfigError` whose message is one line naming the bad key, file or value.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedepic import extensions
from fedepic.domains import (ANY, AT_LEAST_ONE, FINITE, NON_NEGATIVE, PATH, POSITIVE, UNIT, UNIT_OPEN_LOW, Domain,
                             between, check_domains, meta, one_of)
from fedepic.errors import ConfigError
from fedepic.minibatches import SAMPLERS
from fedepic.registry import config_value

MODES = ("centralized", "federated", "decentralized")
ENGINES = ("ray", "local")
DSGD_ORDERS = ("combine_then_adapt", "adapt_then_combine")
MIXINGS = ("metropolis", "uniform_max_degree", "uniform_degree")
CLIENT_MOMENTUM_FORMS = ("ema", "heavy_ball")
GROUP_NAME = r"[A-Za-z0-9_]+"
PURIFICATION_TARGETS = ("auto", "gradient", "weights", "none")
VECTOR_FORMATS = ("pdf", "svg")  # figures.vector
DPI_RANGE = (50, 600)  # figures.dpi
# keys that belong to the whole run, not to one compared member (see `member_config`)
# (the model and the attack too: the router attacks, and both engines build the nodes' data and models,
# with the run's settings)
RUN_LEVEL_KEYS = ("mode", "seed", "output_dir", "name", "progress", "checkpoint_every", "figures", "data",
                  "clients", "rounds", "strategies", "variants", "topology", "ray", "engine", "decentralized",
                  "server", "model", "attack", "log")
PARTITIONS = ("iid", "dirichlet", "shards", "label_sets", "rows")
PROXIES = ("logits", "last_layer")
AUGMENTATIONS = ("none", "crop", "crop_flip")
# the names of the extension points come from their registries (fedepic/extensions.py)
DATASETS = extensions.DATASETS.names()
SERVER_PROTOCOLS = extensions.SERVER_PROTOCOLS.names()
DATA_ATTACKS = extensions.DATA_ATTACKS.names()
MODEL_ATTACKS = extensions.MODEL_ATTACKS.names()
# a server member is a tensor rule (SERVER_RULES; on Ray, Flower's strategy of the same name where one is
# registered) or a reference member (SERVER_STRATEGIES flagged "reference": centralized-epic)
SERVER_STRATEGIES = extensions.SERVER_RULES.names() + extensions.SERVER_STRATEGIES.names("reference")
PEER_STRATEGIES = extensions.PEER_RULES.names()


def algorithm_names() -> tuple[str, ...]:
    """The names ``decentralized.algorithm`` accepts, read from ``extensions.ALGORITHMS`` when asked (what
    each needs is its flags there: `_validate_where_keys_act`, `_validate_member`, `ALGORITHM_NEEDS`)."""
    return extensions.ALGORITHMS.names()


def member_names(mode: str) -> tuple[str, ...]:
    """The member names ``strategies:`` accepts in ``mode``, read from the registries when asked (an
    entry added to a registry is accepted at once)."""
    if mode == "decentralized":
        return extensions.PEER_RULES.names()
    return extensions.SERVER_RULES.names() + extensions.SERVER_STRATEGIES.names("reference")
CENTRAL_DEFENSES = extensions.CENTRAL_DEFENSES.names()
PRE_AGGREGATION = extensions.PRE_AGGREGATION.names()
MODEL_NAMES = extensions.MODELS.names()
TOPOLOGIES = ("ring", "k_regular", "erdos_renyi", "small_world", "complete", "edges")
GP_DETECTORS = ("robust", "records", "epic")
FLIPS = ("pairs", "all", "map")
SEED_LIMIT = 2**32  # derived seeds (seed * 100_003 + ..., seed + 1000 t) must stay inside torch's 64-bit range
ROWS_LIMIT = 10**8  # rows of a dataset, a batch or a class subsample (a larger one is a typo, and would not fit)
NODES_LIMIT = 100_000  # clients or nodes of one run (each holds a model)
NAME_BYTES = 200  # a run's name: its folder ".<stamp>-<name>-N.partial" must fit the 255 bytes of a file name
# the domains of the keys (fedepic.domains): declared beside each default, checked in one place
DEVICE = meta(Domain(text=True, pattern=r"auto|cpu|cuda|cuda:[0-9]+", why="choose auto, cpu, cuda or cuda:N"))
RUN_NAME = meta(Domain(text=True, max_bytes=NAME_BYTES, pattern=r"(?!\.\.?$)[^/]+",
                       why="must be a folder name without '/', not . or .."))
RELATIVE_FOLDER = meta(Domain(text=True, pattern=r"(?!/)(?!(.*/)?\.\.(/|$)).+",
                              why="must be a folder relative to data.root, without '..'"))
MEMBER_NAME = meta(Domain(text=True, max_bytes=NAME_BYTES))  # which names: validate, by mode and registry


@dataclass
class LabelGroup:
    """Clients `clients` hold the labels `labels` (partition=label_sets)."""

    clients: List[int] = field(default_factory=list, metadata=NON_NEGATIVE)
    labels: List[int] = field(default_factory=list, metadata=NON_NEGATIVE)


@dataclass
class DataConfig:
    # mnist | fashion_mnist | cifar10 | imagefolder | synthetic
    name: str = field(default="mnist", metadata=one_of(DATASETS))
    root: Optional[str] = field(default=None, metadata=PATH)  # else $FEDEPIC_DATA, else ~/.cache/fedepic/data
    # imagefolder: <root>/<folder>/{train,test}/<class>/<image>
    folder: str = field(default="cifar10-jpeg", metadata=RELATIVE_FOLDER)
    download: bool = field(default=True, metadata=ANY)  # torchvision datasets download when missing (needs internet)
    # decoded uint8 cache; else $FEDEPIC_CACHE, else ~/.cache/fedepic
    cache_dir: Optional[str] = field(default=None, metadata=PATH)
    # keep only these classes, relabelled 0..k-1 in the given order
    classes: Optional[List[int]] = field(default=None, metadata=NON_NEGATIVE)
    # seeded subsample of each class (CPU smoke runs)
    train_per_class: Optional[int] = field(default=None, metadata=between(1, ROWS_LIMIT))
    test_per_class: Optional[int] = field(default=None, metadata=between(1, ROWS_LIMIT))
    # synthetic: rows in train / test, images 1x28x28, 10 classes
    synthetic_train: int = field(default=2000, metadata=between(1, ROWS_LIMIT))
    synthetic_test: int = field(default=500, metadata=between(1, ROWS_LIMIT))
    # iid | dirichlet | shards | label_sets | rows (read from partition_file)
    partition: str = field(default="iid", metadata=one_of(PARTITIONS))
    # partition=rows: .npz with int arrays client_0 .. client_{count-1}
    partition_file: Optional[str] = field(default=None, metadata=PATH)
    # partition=rows: whether a row may belong to several clients (each holds its own copy; e.g. Byzantine
    # workers' IID rows that honest workers hold too); false refuses rows shared between clients
    shared_rows: bool = field(default=False, metadata=ANY)
    alpha: float = field(default=0.5, metadata=POSITIVE)  # dirichlet concentration
    shards_per_client: int = field(default=2, metadata=AT_LEAST_ONE)  # shards: about k labels per client
    # dirichlet: resample until every client holds at least this many rows
    min_per_client: int = field(default=10, metadata=NON_NEGATIVE)
    label_sets: List[LabelGroup] = field(default_factory=list, metadata=ANY)  # label_sets: who holds which labels


@dataclass
class ModelConfig:
    name: str = field(default="cnn", metadata=one_of(MODEL_NAMES))  # resnet18 (32x32) | cnn (28x28 or 32x32) | cnn_mnist | mnist_net | mlp


@dataclass
class TrainConfig:
    epochs: int = field(default=1, metadata=AT_LEAST_ONE)  # centralized epochs; in FL, see clients.local_epochs
    batch_size: int = field(default=64, metadata=between(1, ROWS_LIMIT))
    lr: float = field(default=0.05, metadata=POSITIVE)
    # heavy-ball momentum of the local optimiser (torch SGD): local epochs (server.protocol=local_epochs,
    # decentralized.algorithm=dpsgd) and mode=centralized; refused elsewhere when set (see client_momentum)
    momentum: float = field(default=0.9, metadata=between(0, 1, open_high=True))
    nesterov: bool = field(default=True, metadata=ANY)  # Nesterov form of `momentum`, where it acts
    # the client EMA beta of the one-step protocols (server.protocol=per_step, decentralized.algorithm=dsgd):
    # m_i <- beta m_i + (1 - beta) g_i; refused elsewhere when set (dsgt has no momentum)
    client_momentum: float = field(default=0.9, metadata=between(0, 1, open_high=True))
    # the form of that momentum, where it acts: ema (m <- beta m + (1 - beta) g) | heavy_ball (m <- beta m + g,
    # undamped, as the EPFL codes; the same steps as ema at lr / (1 - beta)): fedepic/train.py::client_momentum_
    client_momentum_form: str = field(default="ema", metadata=one_of(CLIENT_MOMENTUM_FORMS))
    # the one-step protocols' minibatches (server.protocol=per_step, decentralized.algorithm=dsgd|dsgt;
    # refused elsewhere when set): replacement (each drawn with replacement from all the node's rows) |
    # in_order (the rows in their stored order, batch_size at a time, wrapping around; a data.partition=rows
    # file's order as saved, other partitions ascending): fedepic/minibatches.py
    sampler: str = field(default="replacement", metadata=one_of(SAMPLERS))
    # train.sampler=in_order: an epoch is the first K batches, then the order starts over (None: all the
    # rows, wrapping around); an unshuffled loader stopped after K batches per epoch. Both keys: the same for
    # every member (refused in variants: the nodes' rows are read once, in the sampler's order)
    batches_per_epoch: Optional[int] = field(default=None, metadata=between(1, ROWS_LIMIT))
    # client-side L2: in the local optimiser (local epochs, dpsgd, centralized), inside g_i under dsgd and
    # dsgt; refused under server.protocol=per_step, whose L2 is the server's (server.weight_decay)
    weight_decay: float = field(default=5e-4, metadata=NON_NEGATIVE)
    milestones: List[int] = field(default_factory=list, metadata=AT_LEAST_ONE)  # epochs at which lr *= gamma
    gamma: float = field(default=0.1, metadata=UNIT_OPEN_LOW)
    # none | crop | crop_flip (pad 4, batched on the device)
    augment: str = field(default="none", metadata=one_of(AUGMENTATIONS))
    crop_pad: int = field(default=4, metadata=between(0, 1024))
    device: str = field(default="auto", metadata=DEVICE)  # auto | cpu | cuda | cuda:N
    amp: bool = field(default=True, metadata=ANY)  # bf16 autocast + channels_last on CUDA
    eval_batch_size: int = field(default=1024, metadata=between(1, ROWS_LIMIT))
    # evaluate on the test set every N epochs (centralized) or rounds (and always after the last)
    eval_every: int = field(default=1, metadata=AT_LEAST_ONE)
    # decentralized: at every evaluation also score ONE model, the mean of the benign nodes' models
    # (average_accuracy), and of the benign nodes of each topology.groups entry (average_accuracy_<name>)
    eval_average_model: bool = field(default=False, metadata=ANY)
    # torch CPU threads; None leaves torch's default
    threads: Optional[int] = field(default=None, metadata=between(1, 1024))


@dataclass
class EpicConfig:
    """EPIC (Yang et al., ICML 2022). Paper defaults: 40-epoch pipeline K=10, T=2; 200-epoch K=30, T=10."""

    enabled: bool = field(default=False, metadata=ANY)
    # medoids per class = ceil(fraction * n_c); the paper uses 0.1 / 0.2 / 0.3
    fraction: float = field(default=0.1, metadata=UNIT_OPEN_LOW)
    # the schedule's step (fedepic/builders.py epic_schedule): training epochs in mode=centralized and the
    # federated centralized-epic reference; rounds for federated local EPIC (defense.local_epic); the
    # node's cumulative local epochs for decentralized local EPIC (gp_epic, defense.local_epic)
    warmup: int = field(default=10, metadata=NON_NEGATIVE)  # K: first selection after this many steps
    interval: int = field(default=2, metadata=AT_LEAST_ONE)  # T: then every T steps
    # last selection step; None = the last lr milestone where the step is an epoch (not in rounds)
    until: Optional[int] = field(default=None, metadata=NON_NEGATIVE)
    # logits (softmax - onehot) | last_layer ((p - y) (x) h)
    proxy: str = field(default="logits", metadata=one_of(PROXIES))
    threshold: int = field(default=1, metadata=NON_NEGATIVE)  # drop medoids whose cluster holds <= threshold rows
    # server EPIC on the clients' updates: at least this many medoids per round
    min_medoids: int = field(default=2, metadata=AT_LEAST_ONE)


@dataclass
class PurificationConfig:
    """Gradient Purification (Li et al., FCS 2025) detection knobs; see strategies/gradient_purification.py."""

    # robust z-score above which a neighbour is suspicious this round
    threshold: float = field(default=3.0, metadata=POSITIVE)
    # consecutive suspicious rounds before a neighbour is confirmed malicious
    patience: int = field(default=2, metadata=AT_LEAST_ONE)
    window: int = field(default=4, metadata=AT_LEAST_ONE)
    votes: int = field(default=3, metadata=AT_LEAST_ONE)  # or: suspicious in `votes` of the last `window` rounds
    # a suspect scoring above this is not aggregated even before confirmation
    reject_score: Optional[float] = field(default=30.0, metadata=POSITIVE)
    # floor of the z-score scale, as a fraction of the median distance to the robust centre
    min_scale: float = field(default=0.5, metadata=NON_NEGATIVE)
    # weight of the directional (cosine) term of the suspicion score; 0 disables it
    cos_weight: float = field(default=0.5, metadata=NON_NEGATIVE)
    # robust (z-score of distances) | records (of the records) | epic (EPIC's drops)
    detector: str = field(default="robust", metadata=one_of(GP_DETECTORS))
    # detector=epic: medoid fraction over the neighbours' updates
    epic_fraction: float = field(default=0.5, metadata=UNIT_OPEN_LOW)
    # detector=epic: drop medoids whose cluster holds <= this many updates
    epic_threshold: int = field(default=1, metadata=NON_NEGATIVE)
    # aggregate with ClippedGossip at this radius (null: plain gossip)
    clip_tau: Optional[float] = field(default=None, metadata=POSITIVE)
    # what a confirmation subtracts the records from: gradient (the DSGT trackers), weights (the models),
    # none (the neighbour is only dropped from then on); auto = gradient under dsgt, weights under dpsgd
    target: str = field(default="auto", metadata=one_of(PURIFICATION_TARGETS))
    # oracle detection at T_d = max(1, ceil(oracle_at * rounds)): in round T_d's aggregation every benign
    # node confirms exactly its malicious neighbours, and nothing is flagged before (0: they are never
    # aggregated); null = the detector
    oracle_at: Optional[float] = field(default=None, metadata=UNIT)


@dataclass
class CenteredClippingConfig:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021); see strategies/centered_clipping.py."""

    tau: float = field(default=100.0, metadata=POSITIVE)  # clipping radius (ByzFL's default)
    iterations: int = field(default=1, metadata=between(1, 1000))  # L, clipping steps per round (ByzFL's default)


@dataclass
class GeometricMedianConfig:
    """RFA, the smoothed Weiszfeld geometric median (Pillutla et al., IEEE TSP 2022); strategies/geometric_median.py."""

    iterations: int = field(default=3, metadata=between(1, 1000))  # T, Weiszfeld steps from 0 (ByzFL's default)
    nu: float = field(default=0.1, metadata=POSITIVE)  # smoothing: weights 1 / max(nu, distance) (ByzFL's default)


@dataclass
class DncConfig:
    """DnC (Shejwalkar, Houmansadr, NDSS 2021); see strategies/dnc.py."""

    iterations: int = field(default=5, metadata=AT_LEAST_ONE)  # niters: random coordinate subsets per round
    subsample: int = field(default=10000, metadata=AT_LEAST_ONE)  # b: coordinates per subset (capped at D)
    # c: each iteration drops the floor(c * defense.byzantine) highest outlier scores
    filter_fraction: float = field(default=1.0, metadata=NON_NEGATIVE)


@dataclass
class SignGuardConfig:
    """SignGuard (Xu, Huang, Song, Lan, ICDCS 2022); see strategies/signguard.py."""

    lower: float = field(default=0.1, metadata=NON_NEGATIVE)  # L: keep norms above L * the median norm
    upper: float = field(default=3.0, metadata=POSITIVE)  # R: and below R * the median norm
    # beta: the share of coordinates (one random block) whose signs are clustered
    coordinate_fraction: float = field(default=0.1, metadata=UNIT_OPEN_LOW)


@dataclass
class BalanceConfig:
    """BALANCE (Fang et al., ACM CCS 2024); see strategies/balance.py."""

    gamma: float = field(default=0.3, metadata=POSITIVE)  # accept ||x_i - x_j|| <= gamma exp(-kappa t/T) ||x_i||
    kappa: float = field(default=1.0, metadata=NON_NEGATIVE)  # decay of that radius over the rounds
    alpha: float = field(default=0.5, metadata=UNIT)  # x_i <- alpha x_i + (1 - alpha) mean(accepted)


@dataclass
class MoziConfig:
    """MOZI / UBAR's distance and loss stages (Guo et al., 2020 / TCSVT 2021); see strategies/mozi.py."""

    rho: float = field(default=0.4, metadata=UNIT)  # the share of closest neighbours kept
    alpha: float = field(default=0.5, metadata=UNIT)  # x_i <- alpha x_i + (1 - alpha) mean(kept)
    # dsgd only: MOZI's own gradient step, as ClippedGossip's code takes it (codes/aggregator.py:427-469):
    # x_i <- alpha x_i + (1 - alpha) mean(kept) - lr (g_i(B_i) + g_i(B'_i)), no momentum; see strategies/mozi.py
    own_step: bool = field(default=False, metadata=ANY)


@dataclass
class FLTrustConfig:
    """FLTrust (Cao, Fang, Liu, Gong, NDSS 2021); see strategies/fltrust.py and fedepic/root_set.py."""

    root_size: int = field(default=100, metadata=AT_LEAST_ONE)  # clean training rows the server trains on


@dataclass
class DefenseConfig:
    epic: EpicConfig = field(default_factory=EpicConfig)
    # centralized: e.g. [none, epic-0.1, random, loss, spectral]
    compare: List[str] = field(default_factory=list, metadata=MEMBER_NAME)
    local_epic: bool = field(default=False, metadata=ANY)  # FL: clients run EPIC on their own data
    purification: PurificationConfig = field(default_factory=PurificationConfig)
    # trimmed means (trimmed_mean, fedtrimmedavg): values cut per side
    trim: int = field(default=1, metadata=NON_NEGATIVE)
    # attackers f that Krum (server and peer), MultiKrum, Bulyan, server EPIC, MoNNA (server and peer),
    # DnC and the pre-aggregation steps NNM and ARC assume among the vectors they aggregate; null (the default): the malicious clients a receiver can see, i.e. all of
    # them at a server (as ByzFL and the papers set it), and at a peer the most malicious neighbours any
    # benign node has (fedepic.extensions.assumed_byzantine)
    byzantine: Optional[int] = field(default=None, metadata=NON_NEGATIVE)
    scclip_tau: float = field(default=1.0, metadata=POSITIVE)
    # steps applied before the aggregation, in order: nnm (nearest-neighbour mixing, f = defense.byzantine),
    # clip (static L2 clipping at clip_radius); federated: on the clients' updates before the strategy;
    # decentralized: on {own} ∪ neighbours before a stateless peer rule
    pre_aggregation: List[str] = field(default_factory=list, metadata=one_of(PRE_AGGREGATION))
    clip_radius: float = field(default=1.0, metadata=POSITIVE)
    centered_clipping: CenteredClippingConfig = field(default_factory=CenteredClippingConfig)
    geometric_median: GeometricMedianConfig = field(default_factory=GeometricMedianConfig)
    # bucketing (defense.pre_aggregation: bucketing): inputs per bucket (Karimireddy, He, Jaggi, ICLR 2022)
    bucket_size: int = field(default=2, metadata=between(1, NODES_LIMIT))
    dnc: DncConfig = field(default_factory=DncConfig)  # server rule dnc
    signguard: SignGuardConfig = field(default_factory=SignGuardConfig)  # server rule signguard
    balance: BalanceConfig = field(default_factory=BalanceConfig)  # peer rule balance
    mozi: MoziConfig = field(default_factory=MoziConfig)  # peer rule mozi
    fltrust: FLTrustConfig = field(default_factory=FLTrustConfig)  # server rule fltrust


@dataclass
class AttackConfig:
    data: str = field(default="none", metadata=one_of(DATA_ATTACKS))  # none | label_flip | backdoor | gradient_matching
    # none | sign_flip | bit_flip | gaussian | scaling | alie | ipm | minmax | minsum | fang_krum |
    # fang_trimmed_mean | optimal_alie | optimal_ipm | mimic | dissensus (fedepic.extensions.MODEL_ATTACKS)
    model: str = field(default="none", metadata=one_of(MODEL_ATTACKS))
    # label flip
    flip: str = field(default="pairs", metadata=one_of(FLIPS))  # pairs (c <-> C-1-c) | all | map
    flip_map: List[List[int]] = field(default_factory=list, metadata=NON_NEGATIVE)  # flip=map: [[from, to], ...]
    # backdoor (BadNets)
    backdoor_label: int = field(default=0, metadata=NON_NEGATIVE)
    backdoor_fraction: float = field(default=0.1, metadata=UNIT_OPEN_LOW)
    patch_size: int = field(default=3, metadata=AT_LEAST_ONE)
    # gradient matching (Witches' Brew)
    eps: float = field(default=8.0, metadata=between(0, 255, open_low=True))  # L-inf budget in /255 units
    budget: float = field(default=0.01, metadata=UNIT_OPEN_LOW)  # poisons as a fraction of the training set
    restarts: int = field(default=8, metadata=AT_LEAST_ONE)
    steps: int = field(default=250, metadata=AT_LEAST_ONE)
    # signed-Adam step as a fraction of eps (lr = tau * eps, as in the official code)
    tau: float = field(default=0.1, metadata=POSITIVE)
    # independent (target, poison set) trials in the centralized benchmark
    targets: int = field(default=1, metadata=AT_LEAST_ONE)
    poisons: Optional[str] = field(default=None, metadata=PATH)  # reuse a saved poison set (.npz)
    pretrain_epochs: int = field(default=0, metadata=NON_NEGATIVE)  # clean epochs before brewing; 0 = train.epochs
    # model attacks
    scale: float = field(default=10.0, metadata=FINITE)  # scaling attack factor
    sigma: float = field(default=1.0, metadata=NON_NEGATIVE)  # gaussian attack std
    ipm_eps: float = field(default=0.1, metadata=NON_NEGATIVE)
    alie_z: Optional[float] = field(default=None, metadata=FINITE)  # None = Baruch et al.'s z_max from n and f
    per_neighbour: bool = field(default=False, metadata=ANY)  # decentralized: a different poisoned model per neighbour
    # optimal_alie / optimal_ipm: evaluations of ByzFL's line search over the attack factor
    search_evals: int = field(default=20, metadata=AT_LEAST_ONE)
    # dissensus: eps, how many times the benign pull the malicious neighbours cancel
    dissensus_eps: float = field(default=1.0, metadata=FINITE)
    # mimic: rounds of warm-up in which the mimicked honest client is chosen (then fixed)
    mimic_warmup: int = field(default=1, metadata=AT_LEAST_ONE)
    # minsum: the bound on the malicious update's sum of squared distances to the benign ones: the min over
    # benign i of sum_j ||h_i - h_j||^2 (code: the authors' code, which produced the paper's tables) or the
    # max (paper: the formula in the paper's text); fedepic/attacks/minsum.py
    minsum_bound: str = field(default="code", metadata=one_of(("code", "paper")))
    # one-step protocols (server.protocol=per_step, decentralized.algorithm=dsgd): whether malicious clients
    # keep a client momentum (true) or use their raw minibatch gradient g in its place (false, the EPFL codes'
    # Byzantine workers: bit flip sends -g, label flip the g of flipped labels)
    momentum: bool = field(default=True, metadata=ANY)


@dataclass
class ClientsConfig:
    count: int = field(default=10, metadata=between(1, NODES_LIMIT))
    # the first round(fraction * count) ids, unless malicious_ids is set
    malicious_fraction: float = field(default=0.0, metadata=UNIT)
    malicious_ids: Optional[List[int]] = field(default=None, metadata=NON_NEGATIVE)
    local_epochs: int = field(default=1, metadata=AT_LEAST_ONE)
    # federated: fraction of clients sampled per round
    fraction_train: float = field(default=1.0, metadata=UNIT_OPEN_LOW)
    # FL: the run stops as failed when more than this share of a round's clients fail (raise, or their
    # worker dies); a round where every client fails always stops it. Fewer failures are recorded.
    max_failed_fraction: float = field(default=0.5, metadata=UNIT)


@dataclass
class TopologyConfig:
    # ring | k_regular | erdos_renyi | small_world | complete | edges
    name: str = field(default="ring", metadata=one_of(TOPOLOGIES))
    k: int = field(default=4, metadata=AT_LEAST_ONE)  # k_regular degree; small_world neighbours
    # erdos_renyi edge probability; small_world rewiring probability
    p: float = field(default=0.3, metadata=UNIT_OPEN_LOW)
    edges: List[List[int]] = field(default_factory=list, metadata=NON_NEGATIVE)  # name=edges: [[u, v], ...]
    # the gossip weights w_ij (fedepic/topology.py::mixing_weights): metropolis (1 / (1 + max(d_i, d_j)),
    # symmetric) | uniform_max_degree (1 / (1 + max degree) on every edge, symmetric; ClippedGossip's dumbbell)
    # | uniform_degree (1 / (1 + d_i) at node i: row-stochastic, NOT symmetric); the rest on the diagonal
    mixing: str = field(default="metropolis", metadata=one_of(MIXINGS))
    # named groups of nodes whose benign models train.eval_average_model also averages: {name: [ids]}
    groups: Dict[str, List[int]] = field(default_factory=dict, metadata=ANY)


@dataclass
class DecentralizedConfig:
    """The decentralized algorithm (mode=decentralized); see fedepic/peer_node.py for the equations."""

    # dpsgd: train clients.local_epochs epochs, then gossip the models (Lian et al. 2017);
    # dsgd: one minibatch step per round with client momentum train.client_momentum (the per-step
    #   protocol), train.weight_decay inside the gradient;
    # dsgt: gradient tracking, one plain minibatch step of train.lr per round (DIGing / Pu & Nedic 2021),
    #   no momentum, train.weight_decay inside the gradient
    algorithm: str = field(default="dpsgd", metadata=one_of(algorithm_names))
    # engine=local under dpsgd: the nodes' local epochs in one vectorized loop where the model allows it
    # (mlp; fedepic/stacked_fit.py), equal to training them one by one up to float rounding; false trains
    # one node after another, as Ray nodes do (with train.threads=1, Ray's numbers to the last bit)
    vectorize: bool = field(default=True, metadata=ANY)
    # dsgd's round order: combine_then_adapt (x_i <- R_i({x_j}) - lr m_i) | adapt_then_combine
    # (x_i <- R_i({x_j - lr m_j}): the nodes send, and the attacks act on, their half-step models)
    order: str = field(default="combine_then_adapt", metadata=one_of(DSGD_ORDERS))


@dataclass
class ServerConfig:
    """How a server-based round trains (mode=federated); fedepic/server_rounds.py has the per-step equations."""

    # local_epochs: each sampled client trains clients.local_epochs epochs from the global model and
    #   sends its model; the strategy's aggregate is the new global model (FedAvg-style);
    # per_step: each client takes one minibatch gradient (train.batch_size rows) at the global model,
    #   sends its momentum m_i <- beta m_i + (1 - beta) g_i (beta = train.client_momentum, m_i kept
    #   across rounds); the server aggregates the momenta and steps w <- w - lr (agg + server.weight_decay w)
    protocol: str = field(default="local_epochs", metadata=one_of(SERVER_PROTOCOLS))
    # per_step: the server's step size; None = train.lr (train.milestones count rounds)
    lr: Optional[float] = field(default=None, metadata=POSITIVE)
    # per_step: the L2 term of the server's step (the clients' gradients carry none); refused elsewhere
    # when set (client-side L2 is train.weight_decay)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)


@dataclass
class RayConfig:
    # attach to an existing cluster ("auto" or HOST:PORT); None starts a local one
    address: Optional[str] = field(default=None, metadata=PATH)
    client_cpus: float = field(default=1.0, metadata=between(0, 1024, open_low=True))
    client_gpus: float = field(default=0.0, metadata=between(0, 1024))
    # local cluster size; None = all cores
    num_cpus: Optional[int] = field(default=None, metadata=between(1, 1_000_000))


@dataclass
class FiguresConfig:
    """How the run's figures are saved (fedepic.plots.save_figure): each as PNG and as a vector file."""

    # false: no figures at all (tables, metrics and report.html are always written)
    enabled: bool = field(default=True, metadata=ANY)
    dpi: int = field(default=150, metadata=between(*DPI_RANGE))  # PNG resolution, dots per inch
    # pdf | svg: the copy of every figure for papers (report.html embeds the PNG)
    vector: str = field(default="pdf", metadata=one_of(VECTOR_FORMATS))


@dataclass
class LogConfig:
    """Where a run's metrics go besides metrics.jsonl (the run folder stays the source of truth)."""

    # each member's metrics also as TensorBoard event files beside its metrics.jsonl (needs the
    # tensorboard package: the `tensorboard` extra); `tensorboard --logdir RUN_FOLDER` shows them
    tensorboard: bool = field(default=False, metadata=ANY)


@dataclass
class SweepSettings:
    """How a sweep runs: the reserved keys of ``sweep:`` (fedepic/sweep/). Every other key of ``sweep:``
    is an axis: a dotted config key and the list of its values (``sweep.seed=[0,1,2]``)."""

    # groups of axes that move together (equal lengths)
    zip: List[List[str]] = field(default_factory=list, metadata=ANY)
    # cells as Ray tasks (local instance, or the cluster at ray.address); false: one at a time here
    parallel: bool = field(default=True, metadata=ANY)
    # CPUs a cell declares to Ray; also its torch threads when train.threads is null
    cell_cpus: float = field(default=1.0, metadata=between(0, 1024, open_low=True))
    # GPUs a cell declares to Ray (fractions share one)
    cell_gpus: float = field(default=0.0, metadata=between(0, 1024))
    # Ray runs a cell again when its worker process dies (never when the cell raises)
    max_retries: int = field(default=1, metadata=between(0, 100))
    # aggregated metrics; null: every numeric column of the mode's comparison
    metrics: Optional[List[str]] = field(default=None, metadata=ANY)
    # per-round metrics drawn with a +- s.e. band; null: the mode's panels
    curves: Optional[List[str]] = field(default=None, metadata=ANY)
    # each cell's own figures (matplotlib per cell: docs/results/engines.md); the sweep draws its own
    cell_figures: bool = field(default=False, metadata=ANY)


@dataclass
class RunConfig:
    mode: str = field(default="centralized", metadata=one_of(MODES))  # centralized | federated | decentralized
    seed: int = field(default=0, metadata=between(0, SEED_LIMIT, open_high=True))
    output_dir: str = field(default="runs", metadata=PATH)
    name: str = field(default="run", metadata=RUN_NAME)
    progress: bool = field(default=True, metadata=ANY)  # rich progress bars on stderr
    # a checkpoint (for `resume=`) after every N-th epoch (centralized) or round (federated,
    # decentralized); 0 writes none: a resume then keeps the finished members and starts the
    # interrupted one over
    checkpoint_every: int = field(default=1, metadata=NON_NEGATIVE)
    figures: FiguresConfig = field(default_factory=FiguresConfig)
    log: LogConfig = field(default_factory=LogConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    rounds: int = field(default=10, metadata=AT_LEAST_ONE)
    strategies: List[str] = field(default_factory=lambda: ["fedavg"], metadata=MEMBER_NAME)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # ray (Flower + Ray, one actor per node or client; clusters, GPUs per node) | local (every node or
    # client in this process, the one-step gradients in one vectorized call: many small rounds)
    engine: str = field(default="ray", metadata=one_of(ENGINES))
    decentralized: DecentralizedConfig = field(default_factory=DecentralizedConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # named members to compare: {name: {strategy: RULE, <any member-level keys>: ...}}; a name listed
    # in `strategies` runs RULE with those keys merged over the run's (e.g. one GP per purification target)
    variants: Dict[str, Any] = field(default_factory=dict, metadata=ANY)
    # a grid of runs (fedepic/sweep/): the SweepSettings keys, and axes {dotted key: [values]}; empty: one run
    sweep: Dict[str, Any] = field(default_factory=dict, metadata=ANY)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A path as given if it exists, else `configs/NAME` (".yaml" appended when missing)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    raise ConfigError(f"config file not found: {name} (looked for {path} and {candidate})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (no tags executed) that refuses a key given twice in one mapping: the last one would win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                          f"at offset {err.start})") from None
    except _DuplicateKey as err:
        raise ConfigError(f"duplicate key '{err.key}' in {path} line {err.line}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"YAML syntax error in {path}{where}: {problem}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests its values too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _merge_file(cfg: DictConfig, path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    """``cfg`` <- the config file ``path``; a file with ``extends: OTHER`` merges over OTHER first
    (found beside the file, else as ``config=`` finds it), so a sweep can name the experiment it varies."""
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"invalid value {base!r} for key 'extends' in {path}: expected a config file name")
        beside = path.parent / base
        try:
            base_path = (beside if beside.is_file() else resolve_config_path(base)).resolve()
        except ConfigError:
            raise ConfigError(f"invalid value {base!r} for key 'extends' in {path}: no such config file (looked "
                              f"beside it and in {CONFIG_DIR})") from None
        if base_path in chain or base_path == path.resolve():
            raise ConfigError(f"invalid value {base!r} for key 'extends' in {path}: the files extend each other "
                              "in a loop")
        cfg = _merge_file(cfg, base_path, (*chain, path.resolve()))
    _check_shapes(RunConfig, data, "", str(path))
    return _merge(cfg, OmegaConf.create(data), str(path))


def _field_kind(hint: Any) -> tuple[str, Any]:
    """('section', dataclass) | ('list', element hint) | ('scalar', None) for a schema field's type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if dataclasses.is_dataclass(hint):
        return "section", hint
    if typing.get_origin(hint) in (list, List):
        return "list", typing.get_args(hint)[0]
    if typing.get_origin(hint) in (dict, Dict):
        return "mapping", None
    return "scalar", None


def _describe(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else repr(value)


def _check_shapes(schema: type, data: Any, prefix: str, source: str) -> None:
    """Refuse a scalar where a section is expected, a mapping where a list is, and so on, naming the key.

    OmegaConf's own errors here name the key 'None' or escape as a TypeError, so this walks the plain
    data against the dataclass types first. Unknown keys are left to the merge, which names them.
    """
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        if key not in hints or value is None:
            continue
        _check_value_shape(hints[key], value, f"{prefix}{key}", source)


def _check_value_shape(hint: Any, value: Any, key: str, source: str) -> None:
    kind, inner = _field_kind(hint)
    expected = {"section": "a mapping of keys", "mapping": "a mapping of keys", "list": "a list",
                "scalar": "a single value"}[kind]
    ok = isinstance(value, dict) if kind in ("section", "mapping") else isinstance(value, list) if kind == "list" \
        else not isinstance(value, (dict, list))
    if not ok:
        raise ConfigError(f"invalid value {_describe(value)} for key '{key}' in {source}: expected {expected}")
    if kind == "section":
        _check_shapes(inner, value, f"{key}.", source)
    elif kind == "list":
        for i, item in enumerate(value):
            if item is not None:
                _check_value_shape(inner, item, f"{key}[{i}]", source)


def _omegaconf_message(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Key '" in first and "not in" in first or type(err).__name__ == "ConfigKeyError":
        return f"unknown config key '{key}' in {source}"
    value = getattr(err, "value", None)
    return f"invalid value {value!r} for key '{key}' in {source}: {first}"


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, source)) from None


def _parse_overrides(overrides: List[str]) -> DictConfig:
    seen: set[str] = set()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: expected key=value")
        key = item.split("=", 1)[0].lstrip("+")
        if key in seen:  # the last one would win silently, as a duplicate YAML key would
            raise ConfigError(f"key '{key}' is overridden twice on the command line")
        seen.add(key)
    try:
        parsed = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError, RecursionError):
        raise ConfigError(_bad_override(overrides)) from None
    _check_shapes(RunConfig, OmegaConf.to_container(parsed), "", "overrides")
    return parsed


def _bad_override(overrides: List[str]) -> str:
    """The message naming the first override that does not parse on its own."""
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            OmegaConf.from_dotlist([item])
        except RecursionError:
            return f"invalid value for key '{key.lstrip('+')}' in overrides: nested too deeply"
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            short = value if len(value) <= 60 else value[:57] + "..."
            return f"invalid value {short!r} for key '{key.lstrip('+')}' in overrides: {str(err).splitlines()[0]}"
    return "bad overrides: " + " ".join(overrides)[:200]


def load_config(config: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Schema defaults <- YAML file <- dotted overrides, then `validate`. Returns a typed RunConfig."""
    try:
        return _load_config(config, overrides)
    except RecursionError:  # a value nested thousands deep, in a file or an override
        raise ConfigError(f"a value of {'config file ' + config if config else 'the overrides'} is nested too "
                          "deeply") from None


def _load_config(config: Optional[str], overrides: Optional[List[str]]) -> RunConfig:
    cfg = OmegaConf.structured(RunConfig)
    if config:
        cfg = _merge_file(cfg, resolve_config_path(config))
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "overrides")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(run)
    check_environment(run)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {value!r} for key '{key}': {why}")


def _choice(key: str, value: str, allowed: tuple) -> None:
    _check(value in allowed, key, value, f"choose one of {', '.join(allowed)}")


def _fraction(key: str, value: float, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    _check(not math.isnan(value) and low_ok and value <= 1, key, value, f"must lie in {interval}")


def malicious_ids(cfg: RunConfig) -> List[int]:
    """The malicious client ids: explicit ids, else the first round(fraction * count)."""
    if cfg.clients.malicious_ids is not None:
        return sorted(set(cfg.clients.malicious_ids))
    return list(range(int(round(cfg.clients.malicious_fraction * cfg.clients.count))))


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError (one line naming the key) for the first invalid value: every key's own domain
    (fedepic.domains, declared in the schema above), then what relates keys to each other."""
    check_domains(cfg)
    _validate_data(cfg)
    _validate_defense(cfg)
    _validate_attack(cfg)
    _validate_clients(cfg)
    _check(len(cfg.strategies) > 0, "strategies", cfg.strategies, "list at least one strategy")
    _check(cfg.engine == "ray" or cfg.mode != "centralized", "engine", cfg.engine,
           "engine=local runs mode=federated or decentralized; mode=centralized has no nodes")
    _check(cfg.engine == "ray" or not cfg.train.device.startswith("cuda"), "train.device", cfg.train.device,
           "engine=local runs on the CPU for now; use engine=ray for GPUs")
    _validate_server(cfg)
    _validate_where_keys_act(cfg)
    allowed = member_names(cfg.mode)
    _validate_variants(cfg, allowed)
    for i, name in enumerate(cfg.strategies):
        if name not in cfg.variants:
            _choice(f"strategies[{i}]", name, allowed + tuple(cfg.variants))
        _validate_member(cfg, name, f"strategies[{i}]")
    _validate_topology(cfg)
    sweep_section(cfg)


def _validate_server(cfg: RunConfig) -> None:
    """``server.*``; a protocol flagged ``one_step`` (per_step) refuses what it would ignore (local epochs,
    augmentation, local EPIC, the epoch-based centralized reference, BatchNorm statistics)."""
    protocol = cfg.server.protocol
    _check(cfg.mode == "federated" or protocol == _default(ServerConfig, "protocol"), "server.protocol", protocol,
           f"a protocol of mode=federated (decentralized: {_algorithms_with('client_momentum')} is the per-step one)")
    one_step = extensions.SERVER_PROTOCOLS.has(protocol, "one_step")
    if cfg.server.lr is not None:
        _check(one_step, "server.lr", cfg.server.lr,
               f"the step size of {_protocols_with('one_step')}; {protocol} rounds take the strategy's aggregate")
    if cfg.mode != "federated" or not one_step:
        return
    why = f"server.protocol={protocol} takes one minibatch gradient per client and round"
    _check(cfg.clients.local_epochs == 1, "clients.local_epochs", cfg.clients.local_epochs, f"{why}: leave it at 1")
    _check(cfg.train.augment == "none", "train.augment", cfg.train.augment, f"{why}: set it to none")
    _check(not cfg.defense.local_epic, "defense.local_epic", cfg.defense.local_epic,
           f"{why}; local EPIC selects over epochs")
    references = [name for name in cfg.strategies if extensions.is_reference(name)]
    _check(not references, "strategies", references[0] if references else None,
           f"{why}; the centralized reference trains epochs (use {_protocols_with('local_optimizer')})")
    _check(not extensions.MODELS.has(cfg.model.name, "running_stats"), "model.name", cfg.model.name,
           f"{why}: needs a model without BatchNorm statistics (mlp, cnn)")


def _default(section: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(section) if f.name == key)


def _algorithms_with(flag: str) -> str:
    """``decentralized.algorithm=NAME`` for the algorithms flagged ``flag`` (names joined by ``|``)."""
    return "decentralized.algorithm=" + "|".join(extensions.ALGORITHMS.names(flag))


def _protocols_with(flag: str) -> str:
    """``server.protocol=NAME`` for the server protocols flagged ``flag`` (names joined by ``|``)."""
    return "server.protocol=" + "|".join(extensions.SERVER_PROTOCOLS.names(flag))


def _validate_where_keys_act(cfg: RunConfig) -> None:
    """Each optimisation key acts in one place: ``train.momentum`` and ``train.nesterov`` in the local
    optimiser (centralized, server protocols and algorithms flagged ``local_optimizer``: local_epochs,
    dpsgd), ``train.client_momentum`` in the client momentum of the one-step protocols (protocols and
    algorithms flagged ``client_momentum``: per_step, dsgd), ``train.weight_decay`` on the clients,
    ``server.weight_decay`` in the server step of the protocols flagged ``one_step`` (per_step),
    ``train.sampler`` and ``train.batches_per_epoch`` in the minibatches of the one-step protocols
    (protocols and algorithms flagged ``one_step``). A key set away from its default where it does not act
    is refused; where neither momentum acts (dsgt) the message says there is none."""
    if cfg.mode == "federated":
        protocol = cfg.server.protocol
        setting = f"server.protocol={protocol}"
        local = extensions.SERVER_PROTOCOLS.has(protocol, "local_optimizer")
        client_ema = extensions.SERVER_PROTOCOLS.has(protocol, "client_momentum")
        server_l2 = extensions.SERVER_PROTOCOLS.has(protocol, "one_step")
    elif cfg.mode == "decentralized":
        algorithm = cfg.decentralized.algorithm
        setting = f"decentralized.algorithm={algorithm}"
        local = extensions.ALGORITHMS.has(algorithm, "local_optimizer")
        client_ema, server_l2 = extensions.ALGORITHMS.has(algorithm, "client_momentum"), False
    else:
        setting, local, client_ema, server_l2 = "mode=centralized", True, False, False
    train = cfg.train
    one_step = (cfg.mode == "federated" and server_l2) or (
        cfg.mode == "decentralized" and extensions.ALGORITHMS.has(cfg.decentralized.algorithm, "one_step"))
    _check_sampler(cfg, setting, one_step)
    no_momentum = not local and not client_ema
    if not local:
        how = "without momentum: leave it unset" if no_momentum else \
            "with the client momentum train.client_momentum: set that instead"
        for key in ("momentum", "nesterov"):
            _check(getattr(train, key) == _default(TrainConfig, key), f"train.{key}", getattr(train, key),
                   f"acts in the local optimiser only; {setting} takes one gradient step per round {how}")
    if not client_ema:
        instead = "there is no momentum: leave it unset" if no_momentum else \
            "the optimiser's momentum is train.momentum"
        _check(train.client_momentum == _default(TrainConfig, "client_momentum"), "train.client_momentum",
               train.client_momentum, f"the client momentum of {_protocols_with('client_momentum')} and "
               f"{_algorithms_with('client_momentum')}; under {setting} {instead}")
    if not client_ema:
        _check(train.client_momentum_form == _default(TrainConfig, "client_momentum_form"),
               "train.client_momentum_form", train.client_momentum_form, "the form of train.client_momentum, "
               f"which acts under {_protocols_with('client_momentum')} and {_algorithms_with('client_momentum')} only, "
               f"not under {setting}")
        _check(cfg.attack.momentum == _default(AttackConfig, "momentum"), "attack.momentum", cfg.attack.momentum,
               f"whether malicious clients keep the client momentum of {_protocols_with('client_momentum')} and "
               f"{_algorithms_with('client_momentum')}; under {setting} there is none")
    if server_l2:
        _check(train.weight_decay == _default(TrainConfig, "weight_decay"), "train.weight_decay", train.weight_decay,
               f"the clients' L2; under {setting} the clients send plain gradients and the server applies "
               "the L2: set server.weight_decay")
    else:
        _check(cfg.server.weight_decay == _default(ServerConfig, "weight_decay"), "server.weight_decay",
               cfg.server.weight_decay, f"the L2 of the server step of {_protocols_with('one_step')}; under {setting} "
               "the clients' L2 is train.weight_decay")


def _check_sampler(cfg: RunConfig, setting: str, one_step: bool) -> None:
    """``train.sampler`` and ``train.batches_per_epoch`` pick the minibatches of the one-step protocols
    (``fedepic.minibatches``): refused, when set, where no one-step gradient is taken, and K without
    the in-order sampler."""
    train = cfg.train
    if not one_step:
        for key in ("sampler", "batches_per_epoch"):
            _check(getattr(train, key) == _default(TrainConfig, key), f"train.{key}", getattr(train, key),
                   f"picks the minibatches of {_protocols_with('one_step')} and "
                   f"{_algorithms_with('one_step')}; {setting} takes no one-step gradients")
    if train.batches_per_epoch is not None:
        _check(train.sampler == "in_order", "train.batches_per_epoch", train.batches_per_epoch,
               "read only under train.sampler=in_order")


def _validate_variants(cfg: RunConfig, allowed: tuple) -> None:
    for name, body in cfg.variants.items():
        key = f"variants.{name}"
        _check(cfg.mode == "decentralized", "variants", name, "variants are members of mode=decentralized")
        _check(name not in allowed, key, name, "a variant may not take the name of a strategy")
        _check(isinstance(body, dict) and "strategy" in body, key, body, "expected {strategy: RULE, ...}")
        _check(isinstance(body["strategy"], str), f"{key}.strategy", body["strategy"], "expected a rule name")
        _choice(f"{key}.strategy", body["strategy"], allowed)
        for k in body:
            _check(k not in RUN_LEVEL_KEYS, f"{key}.{k}", body[k], "a run-level key, the same for every member")
        train = body.get("train")
        if isinstance(train, dict) and "sampler" in train:  # the rows are read once, in the sampler's order
            _check(False, f"{key}.train.sampler", train["sampler"], "the same for every member: the nodes' rows "
                   "are read once for the run, in the order train.sampler=in_order reads (data.partition=rows)")


def member_config(cfg: RunConfig, entry: str) -> tuple[str, RunConfig]:
    """(the rule, the member's config) of an entry of ``strategies``: a rule name runs on ``cfg`` as
    is; a variant name runs its ``strategy`` with its keys merged over ``cfg`` (validated)."""
    if entry not in cfg.variants:
        return entry, cfg
    body = {k: v for k, v in dict(cfg.variants[entry]).items() if k != "strategy"}
    _check_shapes(RunConfig, body, f"variants.{entry}.", "the config")
    merged = _merge(OmegaConf.structured(cfg), OmegaConf.create(body), f"variants.{entry}")
    run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return str(cfg.variants[entry]["strategy"]), run


# --------------------------------------------------------------------------- the sweep section

SWEEP_SETTINGS = tuple(f.name for f in dataclasses.fields(SweepSettings))
# keys a sweep cannot vary: where and how its cells are written and run (the same for every cell), and
# the mode, whose comparison columns the aggregation reads
SWEEP_FIXED_KEYS = ("mode", "output_dir", "name", "progress", "figures", "checkpoint_every", "data.cache_dir", "ray",
                    "sweep")


def schema_kind(key: str) -> Optional[str]:
    """What the dotted config ``key`` holds: "section", "list", "mapping" or "scalar"; "any" below a
    mapping field (``variants.NAME...``); None for a key the schema does not have."""
    schema: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(schema)
        if part not in hints:
            return None
        kind, schema = _field_kind(hints[part])
        if depth == len(parts) - 1:
            return kind
        if kind == "mapping":
            return "any"
        if kind != "section":
            return None
    return None


def sweep_section(cfg: RunConfig) -> tuple[SweepSettings, dict[str, list]]:
    """The sweep's settings and its axes ({dotted key: values}, in the order given), validated: one-line
    ConfigErrors name the key. Empty axes: the config is one run."""
    settings_data = {k: v for k, v in cfg.sweep.items() if k in SWEEP_SETTINGS}
    zips = settings_data.get("zip", [])
    _check(isinstance(zips, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in zips), "sweep.zip",
           zips, "a list of groups of axes, e.g. sweep.zip=[[attack.model,attack.ipm_eps]]")
    try:
        settings: SweepSettings = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(SweepSettings), settings_data))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, "the config").replace("key '", "key 'sweep.", 1)) from None
    check_domains(settings, "sweep.")
    axes: dict[str, list] = {}
    for key, value in cfg.sweep.items():
        if key not in SWEEP_SETTINGS:
            _collect_axes(key, value, axes)
    if cfg.sweep:
        _check(bool(axes), "sweep", dict(cfg.sweep), "a sweep needs at least one axis, e.g. sweep.seed=[0,1,2]")
    seen: dict[str, int] = {}
    for i, group in enumerate(settings.zip):
        for name in group:
            _check(name in axes, f"sweep.zip[{i}]", name, f"not an axis of this sweep ({', '.join(axes)})")
            _check(name not in seen, f"sweep.zip[{i}]", name, f"already zipped in sweep.zip[{seen.get(name)}]")
            seen[name] = i
        _check(len(group) >= 2, f"sweep.zip[{i}]", list(group), "zip at least two axes")
        lengths = {name: len(axes[name]) for name in group}
        _check(len(set(lengths.values())) == 1, f"sweep.zip[{i}]", list(group), "zipped axes move together and "
               "need equal lengths: " + ", ".join(f"{name} has {n}" for name, n in lengths.items()))
    return settings, axes


def _collect_axes(key: str, value: Any, axes: dict[str, list]) -> None:
    """Axes under ``sweep.<key>``: a list is the axis of ``key``; a mapping nests dotted keys."""
    kind = schema_kind(key)
    if kind is None:
        raise ConfigError(f"unknown config key '{key}' in sweep.{key}: an axis names a config key")
    fixed = next((f for f in SWEEP_FIXED_KEYS if key == f or key.startswith(f"{f}.")), None)
    _check(fixed is None, f"sweep.{key}", value, f"{fixed} is the same for every cell of a sweep")
    if isinstance(value, dict) and kind in ("section", "any"):
        for sub, inner in value.items():
            _collect_axes(f"{key}.{sub}", inner, axes)
        return
    _check(isinstance(value, list), f"sweep.{key}", value, f"an axis is a list of values, e.g. sweep.{key}=[a,b]")
    _check(len(value) > 0, f"sweep.{key}", value, "list at least one value")
    if kind == "list":  # a single item stands for the list of that item: sweep.strategies=[gossip,gp]
        value = [v if isinstance(v, list) else [v] for v in value]
    elif kind == "section":
        for v in value:
            _check(isinstance(v, dict), f"sweep.{key}", v, f"{key} is a section: each value is a mapping of its keys")
    axes[key] = value


def values_setter(cfg: RunConfig) -> Callable[[Mapping[str, Any]], RunConfig]:
    """A function of ``values`` (dotted key -> value) that returns ``cfg`` with them set (a mapping merges
    over a section), validated and checked against this machine like `load_config`'s result. ``cfg``
    is converted once: OmegaConf's conversion costs more than the merge."""
    base = OmegaConf.structured(cfg)

    def with_values(values: Mapping[str, Any]) -> RunConfig:
        nested: dict[str, Any] = {}
        for key, value in values.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        _check_shapes(RunConfig, nested, "", "the sweep")
        run: RunConfig = OmegaConf.to_object(_merge(base, OmegaConf.create(nested), "the sweep"))  # type: ignore
        validate(run)
        check_environment(run)
        return run

    return with_values


def _validate_member(cfg: RunConfig, entry: str, key: str) -> None:
    """What only a member's own config can tell (the variants' merged keys, the rule's needs)."""
    rule, member = member_config(cfg, entry)
    if member is not cfg:
        try:
            check_domains(member)
            _validate_defense(member)
            _validate_attack(member)
            _validate_where_keys_act(member)
        except ConfigError as err:
            raise ConfigError(f"{err} (in variants.{entry})") from None
    if cfg.mode != "decentralized":
        return
    pur = member.defense.purification
    where = "" if member is cfg else f" (in variants.{entry})"
    algorithm = cfg.decentralized.algorithm
    tracks = extensions.ALGORITHMS.has(algorithm, "tracks_gradient")
    if pur.target == "gradient" and not tracks and extensions.PEER_RULES.has(rule, "stateful"):
        raise ConfigError(f"invalid value 'gradient' for key 'defense.purification.target'{where}: "
                          f"gradient state exists under {_algorithms_with('tracks_gradient')} only")
    if pur.detector == "records" and extensions.PEER_RULES.has(rule, "stateful"):
        screened = "gradient" if tracks else "weights"
        target = pur.target if pur.target != "auto" else screened
        _check(target == screened and extensions.PEER_RULES.has(rule, "records"),
               f"defense.purification.detector{where}", "records",
               f"scores the records of what it screens: needs a GP rule with defense.purification.target="
               f"{screened} here (exclude keeps no records)")
    if member.defense.pre_aggregation and extensions.PEER_RULES.has(rule, "stateful"):
        raise ConfigError(f"invalid value {entry!r} for key '{key}': defense.pre_aggregation runs before "
                          "stateless peer rules; GP and exclude record what they receive as it is")
    one_step = extensions.ALGORITHMS.has(algorithm, "one_step")
    if one_step and (extensions.PEER_RULES.has(rule, "local_epic") or member.defense.local_epic):
        raise ConfigError(f"invalid value {entry!r} for key '{key}': local EPIC selects over epochs, "
                          f"decentralized.algorithm={algorithm} takes one minibatch step per round")
    own_step = extensions.own_step_key(member, rule)
    _check(own_step is None or extensions.ALGORITHMS.has(algorithm, "client_momentum"), f"{own_step}{where}", True,
           f"{rule}'s own gradient step replaces the one-step update of {_algorithms_with('client_momentum')}; "
           f"decentralized.algorithm={algorithm} has none")
    _algorithm_settings(member, where, algorithm)


# What a flag of a decentralized algorithm (fedepic.extensions.ALGORITHMS) refuses in a member's config:
# (key, whether its value is accepted, why). The message reads "decentralized.algorithm=NAME <why>". The
# momentum keys are `_validate_where_keys_act`'s (flags local_optimizer, client_momentum), local EPIC
# `_validate_member`'s (one_step: it names the member).
ALGORITHM_NEEDS: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "one_step": (
        ("train.augment", lambda value: value == "none", "takes plain gradient steps: set it to none"),
        ("clients.local_epochs", lambda value: value == 1, "takes one minibatch step per round: leave it at 1"),
    ),
    "no_running_stats": (
        ("model.name", lambda value: not extensions.MODELS.has(value, "running_stats"),
         "needs a model without BatchNorm statistics (mlp, cnn)"),
    ),
    # y_i <- sum_j w_ij y_j + g_i(new) - g_i(old) keeps sum_i y_i = sum_i g_i only when W's columns sum to 1
    "tracks_gradient": (
        ("topology.mixing", lambda value: value != "uniform_degree",
         "tracks the average gradient, which needs column-stochastic weights: uniform_degree's are only "
         "row-stochastic (use metropolis or uniform_max_degree)"),
    ),
}


def _algorithm_settings(cfg: RunConfig, where: str, algorithm: str) -> None:
    """Refuse what ``algorithm``'s flags say it would ignore (:data:`ALGORITHM_NEEDS`), in flag order of
    that table; a member's own key is named with ``where`` (run-level keys without it)."""
    for flag, needs in ALGORITHM_NEEDS.items():
        if not extensions.ALGORITHMS.has(algorithm, flag):
            continue
        for key, accepted, why in needs:
            value = config_value(cfg, key)
            suffix = "" if key.split(".")[0] in RUN_LEVEL_KEYS else where
            _check(accepted(value), f"{key}{suffix}", value, f"decentralized.algorithm={algorithm} {why}")


def _validate_data(cfg: RunConfig) -> None:
    data = cfg.data
    if data.classes is not None:
        _check(len(data.classes) >= 2 and len(set(data.classes)) == len(data.classes), "data.classes",
               data.classes, "list at least two distinct class ids")
    if data.partition == "rows":
        _check_partition_file(data.partition_file, cfg.clients.count, data.shared_rows)
        for key in ("classes", "train_per_class"):
            _check(getattr(data, key) is None, f"data.{key}", getattr(data, key),
                   "partition=rows indexes the full training set; a subset would give its rows other images")
    else:
        for key in ("partition_file", "shared_rows"):
            _check(getattr(data, key) == _default(DataConfig, key), f"data.{key}", getattr(data, key),
                   "read only under data.partition=rows")
    if data.partition == "label_sets":
        _check(len(data.label_sets) > 0, "data.label_sets", [], "partition=label_sets needs label groups")
        for i, group in enumerate(data.label_sets):
            for client in group.clients:
                _check(0 <= client < cfg.clients.count, f"data.label_sets[{i}].clients", client,
                       f"client ids must lie in [0, {cfg.clients.count})")
            _check(len(group.labels) > 0, f"data.label_sets[{i}].labels", group.labels, "list at least one label")


def _validate_defense(cfg: RunConfig) -> None:
    epic = cfg.defense.epic
    seen: dict[tuple, str] = {}
    for i, name in enumerate(cfg.defense.compare):
        base, _, frac = name.partition("-")
        _choice(f"defense.compare[{i}]", base, CENTRAL_DEFENSES)
        if frac:
            try:
                _fraction(f"defense.compare[{i}]", float(frac))
            except ValueError:
                raise ConfigError(f"invalid value {name!r} for key 'defense.compare[{i}]': "
                                  "expected NAME or epic-FRACTION, e.g. epic-0.1") from None
        # epic, epic-0.1 and epic-0.10 are one member when defense.epic.fraction is 0.1
        selector = extensions.CENTRAL_DEFENSES.has(base, "epic_selector")
        member = (base, float(frac) if frac else (epic.fraction if selector else None))
        _check(member not in seen, f"defense.compare[{i}]", name, f"repeats {seen.get(member)!r}")
        seen[member] = name
    pur = cfg.defense.purification
    if pur.reject_score is not None and not pur.reject_score > pur.threshold:
        raise ConfigError(f"invalid value {pur.reject_score!r} for key 'defense.purification.reject_score': "
                          f"must exceed defense.purification.threshold ({pur.threshold}) or be null")
    _check(pur.votes <= pur.window, "defense.purification.votes", pur.votes,
           f"a neighbour is flagged when suspicious in `votes` of the last defense.purification.window "
           f"({pur.window}) rounds: votes above the window never flag")
    _check(not cfg.defense.pre_aggregation or cfg.mode != "centralized", "defense.pre_aggregation",
           cfg.defense.pre_aggregation, "pre-aggregation runs before the aggregation rules of federated and "
           "decentralized runs")
    rooted = [name for name in cfg.strategies
              if name in extensions.SERVER_RULES and extensions.SERVER_RULES.has(name, "server_update")]
    _check(not (cfg.mode == "federated" and rooted
                and not extensions.SERVER_PROTOCOLS.has(cfg.server.protocol, "local_optimizer")),
           "server.protocol", cfg.server.protocol, f"{rooted[0] if rooted else ''}'s server update is a "
           f"local-training update: use {'|'.join(extensions.SERVER_PROTOCOLS.names('local_optimizer'))}")
    guard = cfg.defense.signguard
    _check(guard.lower < guard.upper, "defense.signguard.lower", guard.lower,
           f"must be below defense.signguard.upper ({guard.upper})")


def _validate_attack(cfg: RunConfig) -> None:
    attack = cfg.attack
    sources = [pair[0] for pair in attack.flip_map if len(pair) == 2]
    for pair in attack.flip_map:
        _check(len(pair) == 2, "attack.flip_map", pair, "each entry is [from, to]")
    _check(len(set(sources)) == len(sources), "attack.flip_map", attack.flip_map, "a class is mapped twice")
    _check(bool(attack.flip_map) or attack.flip != "map" or not _attack_reads(attack, "attack.flip"),
           "attack.flip_map", [], "attack.flip=map needs [[from, to], ...]")
    entry = extensions.MODEL_ATTACKS.get(attack.model)
    for flag, refused in (("decentralized_only", "federated"), ("federated_only", "decentralized")):
        _check(flag not in entry.flags or cfg.mode != refused, "attack.model", attack.model,
               f"{entry.info.get('why', entry.summary)}: not for mode={refused}")
    if attack.poisons is not None:
        _check(os.path.isfile(attack.poisons), "attack.poisons", attack.poisons, "file not found")


def _attack_reads(attack: AttackConfig, key: str) -> bool:
    """Whether the configured data attack's entry binds the config key ``key`` (``attack.flip``, ...)."""
    return key in extensions.DATA_ATTACKS.get(attack.data).params.values()


def _validate_clients(cfg: RunConfig) -> None:
    clients = cfg.clients
    if clients.malicious_ids is not None:
        for cid in clients.malicious_ids:
            _check(0 <= cid < clients.count, "clients.malicious_ids", cid,
                   f"ids must lie in [0, clients.count={clients.count})")
    bad = malicious_ids(cfg)
    key = "clients.malicious_fraction" if clients.malicious_ids is None else "clients.malicious_ids"
    value = clients.malicious_fraction if clients.malicious_ids is None else clients.malicious_ids
    _check(len(bad) < clients.count or cfg.mode == "centralized", key, value,
           f"{len(bad)} malicious clients leave no benign one among clients.count={clients.count}")


def _validate_topology(cfg: RunConfig) -> None:
    topo = cfg.topology
    peer = cfg.mode == "decentralized"
    _check(peer or topo.mixing == _default(TopologyConfig, "mixing"), "topology.mixing", topo.mixing,
           "the gossip weights of mode=decentralized")
    _check(cfg.decentralized.order == _default(DecentralizedConfig, "order")
           or (peer and extensions.ALGORITHMS.has(cfg.decentralized.algorithm, "client_momentum")),
           "decentralized.order", cfg.decentralized.order,
           f"the round order of {_algorithms_with('client_momentum')} (mode=decentralized)")
    _check(peer or not cfg.train.eval_average_model, "train.eval_average_model", cfg.train.eval_average_model,
           "the average model of the benign nodes exists in mode=decentralized only")
    _check(cfg.train.eval_average_model or not topo.groups, "topology.groups", dict(topo.groups),
           "the groups whose average model train.eval_average_model scores: set that too")
    for name, nodes in topo.groups.items():
        _check(re.fullmatch(GROUP_NAME, str(name)) is not None, "topology.groups", name,
               "a group name is letters, digits and _ (it names the column average_accuracy_<name>)")
        _check(len(nodes) > 0, f"topology.groups.{name}", list(nodes), "list at least one node")
        for node in nodes:
            _check(isinstance(node, int) and 0 <= node < cfg.clients.count, f"topology.groups.{name}", node,
                   f"node ids lie in [0, clients.count={cfg.clients.count})")
    for edge in topo.edges:
        _check(len(edge) == 2 and all(0 <= v < cfg.clients.count for v in edge), "topology.edges", edge,
               f"each edge is [u, v] with node ids in [0, {cfg.clients.count})")


# --------------------------------------------------------------------------- checks against this machine

def data_root(data: DataConfig) -> Path:
    if data.root:
        return Path(data.root).expanduser()
    if os.environ.get("FEDEPIC_DATA"):
        return Path(os.environ["FEDEPIC_DATA"]).expanduser()
    return Path.home() / ".cache" / "fedepic" / "data"


def decoded_cache_dir(data: DataConfig) -> tuple[Path, str]:
    """The decoded-image cache folder and the setting it came from (for messages)."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser(), "data.cache_dir"
    if os.environ.get("FEDEPIC_CACHE"):
        return Path(os.environ["FEDEPIC_CACHE"]).expanduser(), "$FEDEPIC_CACHE"
    return Path.home() / ".cache" / "fedepic" / "decoded", "data.cache_dir (default)"


def check_environment(cfg: RunConfig) -> None:
    """Checks that read the file system or the machine; `load_config` runs them, Ray workers do not."""
    check_writable_dir("output_dir", Path(cfg.output_dir).expanduser())
    if not extensions.DATASETS.has(cfg.data.name, "generated"):  # generated data has no decoded cache
        folder, key = decoded_cache_dir(cfg.data)
        check_writable_dir(key, folder)
    _check_device(cfg)
    _check_tensorboard(cfg)
    num_classes, image_size = dataset_shape(cfg.data)
    if num_classes is not None:
        validate_against_dataset(cfg, num_classes, image_size)


def check_writable_dir(key: str, path: Path) -> None:
    """A folder that is, or can be made, writable. Missing folders are created later, except a missing
    top-level folder of an absolute path (most likely a typo, and writable only by root). A link loop
    or an over-long name on the way is refused too (pathlib's exists() would call it missing)."""
    for folder in (path, *path.parents):
        try:
            os.stat(folder)
            break
        except FileNotFoundError:
            continue
        except OSError as err:  # ELOOP, ENAMETOOLONG, ENOTDIR (checked below with a better message)
            if err.errno == errno.ENOTDIR:
                break
            raise ConfigError(f"invalid value '{path}' for key '{key}': {folder}: {err.strerror}") from None
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"invalid value '{path}' for key '{key}': a symbolic link to nothing")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"invalid value '{path}' for key '{key}': a file, not a folder")
    if path.is_absolute() and len(path.parts) > 1 and not Path(*path.parts[:2]).exists():
        raise ConfigError(f"invalid value '{path}' for key '{key}': {Path(*path.parts[:2])} does not exist")
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"invalid value '{path}' for key '{key}': it lies under the file {nearest}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"invalid value '{path}' for key '{key}': {nearest} is not writable")


def _check_partition_file(path: Optional[str], count: int, shared: bool = False) -> None:
    """partition=rows: the file holds client_0 .. client_{count-1}, non-negative integer rows, none twice
    in one client, and none in two clients unless ``shared`` (data.shared_rows); their upper bound is
    checked against the loaded dataset (fedepic.partition.partition). Checked once per file version:
    workers validate the config of every message."""
    _check(path is not None, "data.partition_file", path,
           "partition=rows reads the rows of every client from this .npz file")
    try:
        stat = os.stat(path)  # type: ignore[arg-type]
    except OSError as err:
        raise ConfigError(f"invalid value {path!r} for key 'data.partition_file': cannot read it ({err})") from None
    _checked_partition_file(str(path), stat.st_mtime_ns, stat.st_size, count, shared)


@functools.lru_cache(maxsize=8)
def _checked_partition_file(path: str, mtime_ns: int, size: int, count: int, shared: bool) -> None:
    key = "data.partition_file"
    try:
        import numpy as np

        with np.load(path) as saved:
            parts = {name: saved[name] for name in saved.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line naming it
        raise ConfigError(f"invalid value {path!r} for key '{key}': cannot read it as .npz ({err})") from None
    names = {f"client_{k}" for k in range(count)}
    _check(set(parts) == names, key, path, f"expected the arrays client_0 .. client_{count - 1} "
           f"(clients.count={count}), found {', '.join(sorted(parts)) or 'none'}")
    seen: set[int] = set()
    for name in sorted(names, key=lambda n: int(n.split("_")[1])):
        rows = parts[name]
        _check(rows.ndim == 1 and (rows.size == 0 or rows.dtype.kind in "iu"), key, path,
               f"{name} must be a 1-d array of integer row indices")
        _check(rows.size == 0 or int(rows.min()) >= 0, key, path, f"{name} holds a negative row index")
        rows_set = set(rows.tolist())
        _check(len(rows_set) == rows.size, key, path, f"{name} repeats a row (a client holds each row once)")
        _check(shared or not (rows_set & seen), key, path, f"{name} repeats a row of another client (clients' "
               "rows must be disjoint unless data.shared_rows=true)")
        seen |= rows_set
    _check(bool(seen), key, path, "every client's array is empty: no client would train")


def _check_tensorboard(cfg: RunConfig) -> None:
    """log.tensorboard=true needs the tensorboard package (torch's SummaryWriter imports it)."""
    if cfg.log.tensorboard:
        import importlib.util

        _check(importlib.util.find_spec("tensorboard") is not None, "log.tensorboard", True,
               "the tensorboard package is not installed (pip install tensorboard, or the tensorboard extra)")


def _check_device(cfg: RunConfig) -> None:
    device = cfg.train.device
    if not device.startswith("cuda") or cfg.ray.address is not None:  # cluster workers may have GPUs the driver lacks
        return
    import torch  # only here: the other checks stay light

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
    _check(count > 0, "train.device", device, "CUDA is not available on this machine; use auto or cpu")
    _check(index < count, "train.device", device, f"this machine has {count} CUDA device(s)")


def dataset_shape(data: DataConfig) -> tuple[Optional[int], Optional[int]]:
    """(classes after data.classes, image side) where known without decoding; None where not."""
    if extensions.DATASETS.has(data.name, "folder"):
        train = data_root(data) / data.folder / "train"
        classes = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
        base = len(classes) or None
        side = _first_image_side(classes[0]) if classes else None
    else:
        info = extensions.DATASETS.get(data.name).info  # a dataset without these facts is checked at load
        base, side = info.get("classes"), info.get("side")
    if base is None:
        return None, side
    if data.classes is not None:
        for c in data.classes:
            _check(0 <= c < base, "data.classes", c, f"{data.name} has classes 0..{base - 1}")
        return len(data.classes), side
    return base, side


def _first_image_side(folder: Path) -> Optional[int]:
    """The smaller side of the first image in ``folder`` (its header only), None when unreadable: the
    loader then names the file. Lets a too-large backdoor patch be refused before any decoding."""
    try:
        from PIL import Image

        first = min((p for p in folder.iterdir() if p.is_file()), default=None)
        if first is None:
            return None
        with Image.open(first) as image:
            return min(image.size)
    except Exception:  # noqa: BLE001 - any unreadable file is the loader's to report, by name
        return None


def validate_against_dataset(cfg: RunConfig, num_classes: int, image_size: Optional[int]) -> None:
    """Class ids and patch sizes that must fit the dataset (after data.classes relabels it 0..k-1)."""
    where = f"the dataset has classes 0..{num_classes - 1}"
    attack = cfg.attack
    if _attack_reads(attack, "attack.flip_map") and attack.flip == "map":
        for pair in attack.flip_map:
            _check(all(0 <= c < num_classes for c in pair), "attack.flip_map", pair, where)
    if _attack_reads(attack, "attack.backdoor_label"):
        _check(0 <= attack.backdoor_label < num_classes, "attack.backdoor_label", attack.backdoor_label, where)
    if _attack_reads(attack, "attack.patch_size") and image_size is not None:
        _check(attack.patch_size <= image_size, "attack.patch_size", attack.patch_size,
               f"images are {image_size}x{image_size}")
    if cfg.data.partition == "label_sets":
        for i, group in enumerate(cfg.data.label_sets):
            for label in group.labels:
                _check(0 <= label < num_classes, f"data.label_sets[{i}].labels", label, where)
