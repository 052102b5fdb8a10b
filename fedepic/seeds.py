"""Every seed a run derives from its one ``seed``, in one place: what each seeds, and from what.

No draw that affects a result comes from an unseeded global random number generator: each takes a
generator of its own (``torch.Generator``, ``random.Random``, ``numpy.random.default_rng``) seeded by one
function below or from ``seed`` itself (listed after the table), so a run gives the same numbers on every
engine, after a resume, and in any order of its nodes. (A model built without a seed draws its
throw-away initial weights from torch's global generator before a state is loaded over them; a seeded
one draws under ``torch.random.fork_rng``.)

| function | seeds | formula |
|---|---|---|
| :func:`derive_seed` | the decentralized mode's streams: a node's minibatches and local training (seed, round, node[, draw]) | numpy ``SeedSequence`` mixing of the words |
| :func:`dropout_seed` | the dropout masks of a node's (or client's) minibatch ``draw`` in round t | ``derive_seed(DROPOUT_STREAM, seed, t, node, draw)`` |
| :func:`client_seed` | a server-mode client's data attack (its poisoned rows) | ``seed * 100_003 + 7919 (id + 1)`` |
| :func:`client_round_seed` | that client's local training and client-side model attack in round t | ``client_seed + t`` |
| :func:`server_round_seed` | the server's client sampling in round t (``random.Random``, matching Flower's ``sample_nodes``) | ``seed * 7919 + t`` |
| :func:`server_attack_seed` | the server's omniscient model attacks in round t (only Fang's draw from it) | ``derive_seed(SERVER_ATTACK_STREAM, seed, t)`` |
| :func:`rule_round_seed` | a seeded server rule's draws in round t (DnC, SignGuard) | ``seed * 1_000_003 + t`` |
| :func:`permutation_seed` | bucketing's permutation at a peer (round t, node i) or the server | ``(seed * 1_000_003 + t) * 1_000_033 + i`` mod 2**63; the server is node ``SERVER_NODE`` |
| :func:`peer_attack_seed` | a malicious peer's noise in round t towards a receiver | ``seed * 1_000_003 + 10_007 t + 101 a + r`` mod 2**62 |
| :func:`root_set_seed` | FLTrust's server root set | ``seed * 7919 + 104_729`` |
| :func:`trial_seed` | the centralized mode's target t (its poisons, training, evaluation) | ``seed + 1000 t`` |
| :func:`selection_seed` | the centralized control defenses' random drops (``random_drop``) in target t | ``trial_seed + 7`` |

Seeded from ``seed`` itself, outside the table: the data (``fedepic.data``: the training subsample and
the partitions from ``seed``, the test subsample from ``seed + 1``), the topology (``fedepic.topology``:
``seed`` plus the attempt), the initial model (``seed``), the centralized mode's clean pretraining fit and
its poisoned rows (``seed``: the fit shuffles as target 0's does) and the federated ``centralized-epic``
reference fit (``seed``). EPIC's stochastic greedy, which no shipped run uses (every EPIC is built with
``method="exact"``), takes its caller's seed plus the selection's number plus the class. Fixed seeds, not
from the run's: mimic's first direction z0 (0, as the authors' code) and the dumbbell samplers of
``fedepic.reproduce.dumbbell_rows`` (the authors' seeds). ``fedepic.train.fit`` draws dropout masks from
its training generator (the client's or trial's seed), not from :func:`dropout_seed`.

Why several formulas and not :func:`derive_seed` everywhere: each was written with its mode, and every
figure recorded in ``docs/results`` was measured with them; replacing one changes every number its
stream touches. What they guarantee instead, checked over the ranges a run uses by ``tests/test_seeds.py``
(rounds below 1_000_003, seeds below 2**32):
within each function distinct arguments give distinct seeds (:func:`peer_attack_seed` for node ids
below 99, or for any graph without ``attack.per_neighbour`` and per-receiver attacks, where the
receiver is the attacker: beyond, ``10_007 t + 101 a + r`` repeats, e.g. attacker a towards receiver
r + 101 and attacker a + 1 towards r share their noise, a known limit, kept because the recorded
Gaussian-noise figures were drawn with it), and no two functions that seed the same kind of
generator in one round give the same seed: the torch generators of the server's bucketing permutation,
its seeded rule (DnC, SignGuard) and its omniscient attack, the decentralized minibatch and dropout seeds.
(Before this module the bucketing permutation used the rule's seed, and the attack ``seed * 7919 + t``,
which is the rule's at seed 0; :func:`server_round_seed` and :func:`rule_round_seed` still meet at seed
0, one seeding Python's sampler and the other a torch generator. :func:`permutation_seed` of the server
equals peer node 412,796's 2,147 rounds later: no run has both.)

Cost: O(1) per seed (:func:`derive_seed`: one ``SeedSequence``, a few microseconds).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SEED_STRIDE = 1_000_003  # seed * SEED_STRIDE + round: distinct for rounds < 1_000_003
NODE_STRIDE = 1_000_033  # a peer's permutation: (seed * SEED_STRIDE + round) * NODE_STRIDE + node
SERVER_NODE = 2**31 - 1  # the server's "node" in permutation_seed: no peer has this id
SERVER_ATTACK_STREAM = 0x61747461  # "atta": the server attacks' stream, apart from every formula above


def derive_seed(base: int, *parts: int) -> int:
    """A deterministic 63-bit seed from non-negative integers (numpy SeedSequence mixing).

    >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    True
    """
    words = [int(base) & 0xFFFFFFFF, *(int(p) & 0xFFFFFFFF for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


DROPOUT_STREAM = 0x64726F70  # "drop": the dropout masks' own stream, apart from the minibatch seeds


def dropout_seed(seed: int, round_: int, node: int, draw: int = 0) -> int:
    """The dropout seed of node (or client) ``node``'s minibatch number ``draw`` in ``round_``
    (``fedepic.dropout``): :func:`derive_seed` over ``DROPOUT_STREAM`` first, so it never equals a
    minibatch seed, which :func:`derive_seed` takes from (seed, round, node[, draw])."""
    return derive_seed(DROPOUT_STREAM, seed, round_, node, draw)


def client_seed(seed: int, client_id: int) -> int:
    """A server-mode client's seed: its data attack's generator (and, plus the round, its training)."""
    return int(seed) * 100_003 + 7919 * (int(client_id) + 1)


def client_round_seed(seed: int, client_id: int, round_: int) -> int:
    """A server-mode client's local training and client-side model attack in ``round_``."""
    return client_seed(seed, client_id) + int(round_)


def server_round_seed(seed: int, round_: int) -> int:
    """The server's sample of clients in ``round_`` (a ``random.Random``)."""
    return int(seed) * 7919 + int(round_)


def server_attack_seed(seed: int, round_: int) -> int:
    """The server's omniscient model attack in ``round_`` (a ``torch.Generator``): only Fang et al.'s
    attacks draw from it (ALIE, IPM, min-max / min-sum and their optimized forms are deterministic, mimic's
    z0 has its own fixed seed), so no recorded figure changed when it left :func:`server_round_seed`."""
    return derive_seed(SERVER_ATTACK_STREAM, seed, round_)


def rule_round_seed(seed: int, round_: int) -> int:
    """A seeded server rule's generator in ``round_`` (``strategies.aggregate.round_generator``)."""
    return int(seed) * SEED_STRIDE + int(round_)


def permutation_seed(seed: int, round_: int, node: Optional[int] = None) -> int:
    """Bucketing's permutation in ``round_`` at peer ``node``, or at the server (``node`` None, taken as
    ``SERVER_NODE``, so that it never equals :func:`rule_round_seed`, whose rules may follow it).

    >>> permutation_seed(7, 2, 3)
    7000254000762
    """
    key = int(seed) * SEED_STRIDE + int(round_)
    return (key * NODE_STRIDE + (SERVER_NODE if node is None else int(node))) % (2**63)


def peer_attack_seed(seed: int, round_: int, attacker: int, receiver: int) -> int:
    """A malicious peer's noise in ``round_`` towards ``receiver`` (``receiver == attacker`` when one
    poisoned model goes to every neighbour)."""
    return (int(seed) * SEED_STRIDE + int(round_) * 10_007 + int(attacker) * 101 + int(receiver)) % (2**62)


def root_set_seed(seed: int) -> int:
    """FLTrust's root set, drawn once per run (``fedepic.root_set``)."""
    return int(seed) * 7_919 + 104_729


def trial_seed(seed: int, target: int) -> int:
    """The centralized mode's target ``target``: its setup, poisons, training and evaluation."""
    return int(seed) + 1000 * int(target)


def selection_seed(trial: int) -> int:
    """A centralized defense's generator in the trial seeded ``trial`` (:func:`trial_seed`)."""
    return int(trial) + 7
