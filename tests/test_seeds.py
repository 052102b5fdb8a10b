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
    assert seeds.server_attack_seed(3, 4) == seeds.derive_seed(0x61747461, 3, 4)
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
    assert distinct(seeds.server_attack_seed(s, t) for s in SEEDS for t in range(1, 5000))
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
    """The server's torch generators of one round (bucketing's permutation, a seeded rule such as DnC or
    SignGuard, the omniscient attack) get distinct seeds (the permutation had the rule's before SERVER_NODE,
    the attack had the rule's at seed 0 before server_attack_seed); the decentralized minibatch and dropout
    seeds of the same (seed, round, node, draw) differ too. The sampler's seed (Python's random.Random)
    still equals the rule's at seed 0, as the module docstring says."""
    rounds = range(1, 5000)
    torch_streams = [{f(s, t) for s in SEEDS for t in rounds}
                     for f in (seeds.permutation_seed, seeds.rule_round_seed, seeds.server_attack_seed)]
    for a, b in itertools.combinations(torch_streams, 2):
        assert not a & b
    assert seeds.server_round_seed(0, 5) == seeds.rule_round_seed(0, 5)  # Python's sampler against a torch generator
    keys = list(itertools.product(SEEDS, range(1, 40), range(30), range(2)))
    assert not {seeds.derive_seed(*k) for k in keys} & {seeds.dropout_seed(*k) for k in keys}


# arithmetic on a seed that the module docstring lists as seeded outside the table (file, enclosing function)
OUTSIDE_THE_TABLE = {
    ("fedepic/data.py", "load_dataset"): "the test subsample's seed + 1",
    ("fedepic/topology.py", "_k_regular"): "the topology's seed + attempt",
    ("fedepic/topology.py", "_erdos_renyi"): "the topology's seed + attempt",
    ("fedepic/epic.py", "run"): "EPIC's stochastic greedy: seed + class (no shipped run)",
    ("fedepic/epic.py", "select"): "EPIC's stochastic greedy: seed + selection (no shipped run)",
}


def seed_named(node: ast.AST) -> bool:
    return any(("seed" in n.id.lower()) if isinstance(n, ast.Name) else ("seed" in n.attr.lower())
               for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute)))


def unwrapped(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Call) and getattr(node.func, "id", "") in {"int", "abs"} and node.args:
        node = node.args[0]
    return node


def inline_seed_arithmetic(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, enclosing function) of every arithmetic on a seed-named value passed to a call (positional or
    keyword, through int() / abs() and either branch of ``a if c else b``) or assigned to any variable."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        values = []
        if isinstance(node, ast.Call):
            values = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            values = [node.value]
        branches = [b for v in values for b in ((v.body, v.orelse) if isinstance(v, ast.IfExp) else (v,))]
        for value in map(unwrapped, branches):
            if isinstance(value, ast.BinOp) and seed_named(value):
                found.append((node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def test_no_seed_is_derived_inline():
    """Arithmetic on a seed, passed to a call or stored in a variable, appears only in
    fedepic/seeds.py, or where its module docstring lists a draw seeded outside the table
    (OUTSIDE_THE_TABLE); the first positional argument of ``manual_seed`` and the like is then never an
    expression on a seed."""
    found, used = [], set()
    for folder in ("fedepic", "strategies", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "seeds.py":
                continue
            rel = str(path.relative_to(ROOT))
            for line, function in inline_seed_arithmetic(ast.parse(path.read_text())):
                if (rel, function) in OUTSIDE_THE_TABLE:
                    used.add((rel, function))
                else:
                    found.append(f"{rel}:{line} ({function})")
    assert not found, found
    assert used == set(OUTSIDE_THE_TABLE), set(OUTSIDE_THE_TABLE) - used  # no stale exception


def test_the_scan_finds_the_old_forms():
    """The scan would have caught each inline form this module replaced."""
    for source in ("seed = client_seed(cfg, c) + server_round",
                   "g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rnd))",
                   "choose_setup(y, budget=3, seed=cfg.seed + 1000 * t)",
                   "mixed = (seed * 1_000_003 + round_ * 10_007) % 2**62",
                   "Trial(t, cfg.seed + 1000 * t, rows)",
                   "seed = None if self.seed is None else self.seed + self.selections"):
        assert inline_seed_arithmetic(ast.parse(source)), source
    assert not inline_seed_arithmetic(ast.parse("g = torch.Generator().manual_seed(trial_seed(cfg.seed, t))"))


def test_the_module_doctests_pass():
    import doctest

    result = doctest.testmod(seeds)
    assert result.failed == 0 and result.attempted >= 2
