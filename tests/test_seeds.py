"""fedepic/seeds.py: every derived seed in one place, its formula pinned (recorded figures depend on it),
distinct within each stream over the ranges a run uses, and no two streams of one round meeting."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np

from fedepic import seeds
from fedepic.dropout import mask_seed

ROOT = Path(__file__).resolve().parent.parent
SEEDS, ROUNDS = range(3), range(1, 301)


def test_the_formulas_are_the_recorded_ones():
    """What docs/results were measured with: changing one changes every number of its stream."""
    assert seeds.client_seed(2, 5) == 2 * 100_003 + 7919 * 6
    assert seeds.client_round_seed(2, 5, 9) == 2 * 100_003 + 7919 * 6 + 9
    assert seeds.server_round_seed(3, 4) == 3 * 7919 + 4
    assert seeds.rule_round_seed(3, 4) == 3 * 1_000_003 + 4
    assert seeds.permutation_seed(7, 2, 3) == (7 * 1_000_003 + 2) * 1_000_033 + 3
    assert seeds.peer_attack_seed(1, 2, 3, 4) == 1_000_003 + 2 * 10_007 + 3 * 101 + 4
    assert seeds.root_set_seed(1) == 7919 + 104_729
    assert seeds.trial_seed(1, 2) == 2001 and seeds.selection_seed(2001) == 2008
    words = np.random.SeedSequence([1, 2, 3]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    assert seeds.derive_seed(1, 2, 3) == int(words)
    # the dropout masks' seeds as fedepic.dropout derived them before this module
    old = np.random.SeedSequence([0x64726F70, 4, 5, 6, 1]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    assert mask_seed(4, 5, 6, 1) == seeds.dropout_seed(4, 5, 6, 1) == int(old)


def distinct(values) -> bool:
    values = list(values)
    return len(set(values)) == len(values)


def test_each_stream_is_distinct_over_a_runs_ranges():
    nodes = range(60)
    assert distinct(seeds.derive_seed(s, t, i) for s in SEEDS for t in ROUNDS for i in nodes)
    assert distinct(seeds.dropout_seed(s, t, i) for s in SEEDS for t in ROUNDS for i in nodes)
    assert distinct(seeds.client_round_seed(s, c, t) for s in SEEDS for c in range(100) for t in ROUNDS)
    assert distinct(seeds.server_round_seed(s, t) for s in SEEDS for t in range(1, 5000))
    assert distinct(seeds.rule_round_seed(s, t) for s in SEEDS for t in range(1, 5000))
    assert distinct(seeds.permutation_seed(s, t, i) for s in SEEDS for t in ROUNDS for i in [*nodes, None])
    assert distinct(seeds.trial_seed(s, t) for s in SEEDS for t in range(100))


def test_a_peers_attack_noise_is_its_own_below_99_nodes_and_shared_beyond():
    """The known limit the module docstring states: 10_007 t + 101 a + r repeats once 101 a + r reaches
    10_007 (a node id of 99 or more) or r reaches 101."""
    pairs = [(a, r) for a in range(99) for r in range(99)]
    assert distinct(seeds.peer_attack_seed(s, t, a, r) for s in SEEDS for t in range(1, 60) for a, r in pairs)
    assert distinct(seeds.peer_attack_seed(0, t, a, a) for t in range(1, 300) for a in range(1000))  # one per sender
    assert seeds.peer_attack_seed(0, 1, 0, 101) == seeds.peer_attack_seed(0, 1, 1, 0)
    assert seeds.peer_attack_seed(0, 1, 99, 8) == seeds.peer_attack_seed(0, 2, 0, 0)


def test_streams_of_one_round_never_meet():
    """The server's bucketing permutation and a seeded server rule (DnC, SignGuard) draw in the same round
    from torch generators: their seeds differ (they were equal before SERVER_NODE); the decentralized
    minibatch and dropout seeds of the same (seed, round, node, draw) differ too."""
    rounds = range(1, 5000)
    server = {seeds.permutation_seed(s, t) for s in SEEDS for t in rounds}
    assert not server & {seeds.rule_round_seed(s, t) for s in SEEDS for t in rounds}
    assert not server & {seeds.server_round_seed(s, t) for s in SEEDS for t in rounds}
    keys = list(itertools.product(SEEDS, range(1, 40), range(30), range(2)))
    assert not {seeds.derive_seed(*k) for k in keys} & {seeds.dropout_seed(*k) for k in keys}


SEEDING_CALLS = {"manual_seed", "Random", "default_rng", "SeedSequence", "seed"}


def test_no_seed_is_derived_inline():
    """A generator is seeded with a name or a call (a function of fedepic.seeds), never with arithmetic
    written at the call: every derivation lives in fedepic/seeds.py."""
    found = []
    for folder in ("fedepic", "strategies", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "seeds.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in SEEDING_CALLS and isinstance(node.args[0], ast.BinOp):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_the_module_doctests_pass():
    import doctest

    result = doctest.testmod(seeds)
    assert result.failed == 0 and result.attempted >= 2
