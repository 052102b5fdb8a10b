"""The registries (fedepic/extensions.py): every entry binds to a config, no class default can differ
from the schema's, the config accepts exactly the registered names, and the generated config reference
(docs/reference/config.md, fedepic.config_reference) lists them."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from fedepic import extensions as ext
from fedepic.config import load_config
from fedepic.registry import Entry, Registry

REGISTRIES = [ext.PEER_RULES, ext.SERVER_STRATEGIES, ext.SERVER_RULES, ext.SERVER_PROTOCOLS, ext.PRE_AGGREGATION,
              ext.MODEL_ATTACKS, ext.DATA_ATTACKS, ext.CENTRAL_DEFENSES, ext.DATASETS, ext.MODELS, ext.ALGORITHMS]
OURS = ("fedepic.", "strategies.", "simulations.")  # Flower's own classes keep Flower's defaults


@pytest.mark.parametrize("registry", REGISTRIES + [ext.SERVER_RULES], ids=lambda r: r.kind)
def test_every_entry_loads_and_no_mapped_parameter_has_a_class_default(registry: Registry) -> None:
    for entry in registry:
        target = entry.load()
        if not entry.target.startswith(OURS) or not callable(target):
            continue
        params = inspect.signature(target).parameters
        for name in entry.params:
            assert name in params, f"{entry.name}: {name} is not a parameter of {entry.target}"
            assert params[name].default is inspect.Parameter.empty, (entry.name, name)


def test_every_configurable_entry_binds_from_the_default_config() -> None:
    cfg = load_config(None, ["mode=decentralized", "strategies=[gossip]"])
    for name in ext.PEER_RULES.names():
        assert ext.PEER_RULES.build(name, cfg) is not None
    for name in ext.MODEL_ATTACKS.names():
        ext.MODEL_ATTACKS.arguments(name, cfg, {"n": 10, "f": 2})
    for name in ext.DATA_ATTACKS.names():
        assert hasattr(ext.DATA_ATTACKS.build(name, cfg), "poison")


def test_every_flower_strategy_has_a_server_rule() -> None:
    """Flower's strategies are optional counterparts of the tensor rules (engine=ray uses them, and
    the tests check they agree); a rule without one runs on both engines through the tensor rule."""
    strategies = {n for n in ext.SERVER_STRATEGIES.names() if not ext.SERVER_STRATEGIES.has(n, "reference")}
    assert strategies <= set(ext.SERVER_RULES.names())
    assert not set(ext.SERVER_RULES.names()) & set(ext.SERVER_STRATEGIES.names("reference"))


def test_every_server_rule_binds_like_its_flower_strategy() -> None:
    """Each rule builds from a config alone and gets the very values its Flower strategy's parameters get."""
    cfg = load_config(None, ["mode=federated", "clients.count=20", "defense.byzantine=4", "defense.trim=3"])
    for name in ext.SERVER_RULES.names():
        rule = ext.SERVER_RULES.build(name, cfg)
        assert callable(rule)
        if name not in ext.SERVER_STRATEGIES:
            continue
        flower = ext.SERVER_STRATEGIES.arguments(name, cfg)
        for key, value in ext.SERVER_RULES.arguments(name, cfg).items():
            assert flower[key] == value == getattr(rule, key), (name, key)
    assert ext.SERVER_RULES.build("bulyan", cfg).num_malicious_nodes == 4  # 4 * 4 + 3 <= 20
    assert ext.SERVER_RULES.build("multikrum", cfg).num_nodes_to_select == 16


def _bound_target(x, /, *, d, e=5, g):  # positional-only x is the call's data, never bound
    return d, e, g


def test_binding_reads_keys_then_context_then_defaults() -> None:
    registry = Registry("thing", [Entry("t", f"{__name__}:_bound_target", params={"d": "seed"})])
    cfg = load_config(None, ["seed=7"])
    assert registry.arguments("t", cfg, {"g": 1, "unused": 2}) == {"d": 7, "g": 1}
    with pytest.raises(TypeError, match="parameter 'g' has no config key or runtime value"):
        registry.arguments("t", cfg)
    with pytest.raises(ValueError, match="registered twice"):
        Registry("thing", [Entry("t", "x:y"), Entry("t", "x:z")])


def test_the_config_accepts_exactly_the_registered_names() -> None:
    from fedepic.errors import ConfigError

    for name in ext.PEER_RULES.names():
        load_config(None, ["mode=decentralized", f"strategies=[{name}]"])
    with pytest.raises(ConfigError, match="choose one of gossip, median"):
        load_config(None, ["mode=decentralized", "strategies=[nope]"])
    for name in ext.MODEL_ATTACKS.names():
        load_config(None, [f"attack.model={name}"])
    for name in ext.ALGORITHMS.names():
        cfg = load_config(None, ["mode=decentralized", "strategies=[gossip]", "model.name=mlp",
                                 f"decentralized.algorithm={name}"])
        assert cfg.decentralized.algorithm == name
    with pytest.raises(ConfigError, match="'decentralized.algorithm': choose one of dpsgd, dsgd, dsgt$"):
        load_config(None, ["mode=decentralized", "decentralized.algorithm=nope"])


def test_the_config_reference_tables_are_the_registries() -> None:
    from fedepic.config_reference import REGISTRIES as LISTED, markdown

    page = markdown()
    assert {id(registry) for registry, _ in LISTED} == {id(registry) for registry in REGISTRIES}
    for registry in REGISTRIES:
        assert registry.table() in page, f"the config reference lacks the {registry.kind} table"


def test_the_comments_and_headings_name_what_the_registries_hold() -> None:
    """attack.model's comment lists every model attack, defense.byzantine's every entry that takes f from
    it, and the server rules' heading claims Flower equality only for the rules tests/test_server_rules.py
    checks against a Flower strategy."""
    from fedepic.config import AttackConfig, DefenseConfig
    from fedepic.config_reference import REGISTRIES as LISTED, _comments
    from tests.test_server_rules import NAMES

    listed = _comments(AttackConfig)["model"]
    assert set(listed.replace("|", " ").replace("(", " ").split()) >= set(ext.MODEL_ATTACKS.names())
    byzantine = _comments(DefenseConfig)["byzantine"]
    for registry in (ext.PEER_RULES, ext.SERVER_RULES, ext.PRE_AGGREGATION):
        for entry in registry:
            if any(v is ext.assumed_byzantine for v in entry.params.values()):
                shown = {"krum": "Krum", "multikrum": "MultiKrum", "epic": "EPIC", "monna": "MoNNA", "dnc": "DnC",
                         "nnm": "NNM", "arc": "ARC"}[entry.name]
                assert shown in byzantine, entry.name
    heading = dict((r.kind, h) for r, h in LISTED)["server rule"]
    claimed = {n for n in ext.SERVER_RULES.names() if f"`{n}`" in heading.split("tested equal to it:")[1]}
    assert claimed == set(NAMES)


def test_the_algorithms_declare_what_they_need():
    """The flags the validation and the engines read (fedepic/extensions.py's docstring), per algorithm."""
    flags = {entry.name: set(entry.flags) for entry in ext.ALGORITHMS}
    assert flags == {"dpsgd": {"local_optimizer"},
                     "dsgd": {"one_step", "client_momentum", "no_running_stats"},
                     "dsgt": {"one_step", "tracks_gradient", "no_running_stats"}}


def test_the_server_protocols_declare_what_they_need():
    """The flags the validation and both engines read (``fedepic.server_rounds.per_step``, the ClientApp)."""
    from fedepic.server_rounds import per_step

    flags = {entry.name: set(entry.flags) for entry in ext.SERVER_PROTOCOLS}
    assert flags == {"local_epochs": {"local_optimizer"}, "per_step": {"one_step", "client_momentum"}}
    for name, one_step in (("local_epochs", False), ("per_step", True)):
        cfg = load_config(None, ["mode=federated", "model.name=mlp", f"server.protocol={name}"])
        assert per_step(cfg) is one_step


def test_the_entry_flags_say_what_the_name_comparisons_said():
    """The flags and info that replaced name comparisons (issue 30) hold for exactly the entries the
    names picked, and agree with what the targets themselves declare."""
    from types import SimpleNamespace

    from fedepic.attacks.model_attacks import acts_where_trained, honest_rows_needed

    assert ext.PEER_RULES.names("records") == ("gp", "gp_epic")
    assert [e.name for e in ext.PEER_RULES if "own_step" in e.info] == ["mozi"]
    assert ext.CENTRAL_DEFENSES.names("epic_selector") == ("epic",)
    assert ext.DATA_ATTACKS.names("poison_set") == ("gradient_matching",)
    assert ext.MODEL_ATTACKS.names("inactive") == ext.DATA_ATTACKS.names("inactive") == ("none",)
    assert ext.MODEL_ATTACKS.names("decentralized_only") == ("dissensus",)
    assert ext.MODEL_ATTACKS.names("federated_only") == ("fang_krum", "fang_trimmed_mean")
    assert [n for n in ext.MODEL_ATTACKS.names() if acts_where_trained(n)] == ["sign_flip", "gaussian", "scaling",
                                                                               "bit_flip"]
    needs = {n: honest_rows_needed(n, {}) for n in ext.MODEL_ATTACKS.names() if honest_rows_needed(n, {})}
    assert needs == {"alie": 2, "ipm": 1, "minmax": 2, "minsum": 2, "fang_krum": 1, "fang_trimmed_mean": 1,
                     "optimal_alie": 2, "optimal_ipm": 1, "mimic": 1}
    assert honest_rows_needed("minmax", {"perturbation": "sign"}) == 1
    # the rows a data attack draws: all flippable rows of a malicious client for label_flip and the budget
    # centrally; attack.backdoor_fraction in both modes for backdoor; none for none and the poison sets
    cfg = load_config(None, ["attack.budget=0.03", "attack.backdoor_fraction=0.2"])
    fractions = {n: (a.client_fraction, a.central_fraction) for n in ext.DATA_ATTACKS.names()
                 for a in [ext.DATA_ATTACKS.build(n, SimpleNamespace(attack=cfg.attack))]}
    assert fractions == {"none": (None, None), "label_flip": (1.0, 0.03), "backdoor": (0.2, 0.2),
                         "gradient_matching": (None, None)}
    # a dataset's flags are its source's: generated data is never cached, a folder dataset reads its
    # cached files from data.folder
    for entry in ext.DATASETS:
        source = entry.load()
        folder = source.folder is None and source.cached
        assert ("generated" in entry.flags, "folder" in entry.flags) == (not source.cached, folder), entry.name
    assert ext.DATASETS.names("folder") == ("imagefolder",) and ext.DATASETS.names("generated") == ("synthetic",)


def test_both_engines_dispatch_through_the_algorithm_entry():
    """The entry's target is the algorithm's node step, which the Ray ClientApp and ``LocalMember`` both
    build (``fedepic.algorithms.node_step``); the in-process member is the entry's ``info["member"]`` or
    ``LocalMember``."""
    from fedepic.algorithms import node_step
    from fedepic.algorithms.dpsgd import Dpsgd
    from fedepic.algorithms.dsgd import Dsgd
    from fedepic.algorithms.dsgt import Dsgt
    from fedepic.peer_local import LocalMember
    from fedepic.peer_node import is_dsgd, is_dsgt, one_step
    from fedepic.peer_stacked import StackedDsgdMember, member_class

    expected = {"dpsgd": (Dpsgd, LocalMember, False, False, False), "dsgd": (Dsgd, StackedDsgdMember, False, True, True),
                "dsgt": (Dsgt, LocalMember, True, False, True)}
    for name, (step, member, tracks, momentum, single) in expected.items():
        cfg = load_config(None, ["mode=decentralized", "strategies=[gossip]", "model.name=mlp",
                                 f"decentralized.algorithm={name}"])
        assert step is ext.ALGORITHMS.get(name).load() and type(node_step(cfg)) is step
        assert member_class(cfg) is member
        assert (is_dsgt(cfg), is_dsgd(cfg), one_step(cfg)) == (tracks, momentum, single), name


PRODUCT = ("fedepic", "strategies", "simulations", "benchmarks")
ROOT = Path(__file__).resolve().parents[1]


def _compared_strings(node: ast.Compare) -> list[str]:
    """The string constants a comparison reads: its operands and the items of literal tuples, lists, sets."""
    found = []
    for operand in [node.left, *node.comparators]:
        items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        found += [item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return found


def test_no_algorithm_name_is_compared_by_string_outside_the_registry():
    """The engines and the validation ask an algorithm's flags (``ALGORITHMS.has``), never its name:
    ``algorithm == "dsgt"`` or ``algorithm in ("dsgd", "dsgt")`` anywhere in the product fails here."""
    names = set(ext.ALGORITHMS.names())
    found = []
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "fedepic" / "extensions.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Compare) and names & set(_compared_strings(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"algorithm names compared by string: {found}"


# What may name a registered name outside fedepic/extensions.py, as (file, name, what it is compared with;
# "dict" for a table's keys): each is not registry dispatch, and says why. Anything else the probe finds
# fails the test below.
ALLOWED_NAMES = {
    # train.augment's value "none" (config.AUGMENTATIONS), not the data or model attack "none"
    ("fedepic/centralized.py", "none", "cfg.train.augment"): "train.augment",
    ("fedepic/config.py", "none", "cfg.train.augment"): "train.augment",
    ("fedepic/config.py", "none", "value"): "train.augment (ALGORITHM_NEEDS' one_step check)",
    ("fedepic/stacked_fit.py", "none", "cfg.augment"): "train.augment (a TrainConfig)",
    ("fedepic/train.py", "none", "cfg.augment"): "train.augment (a TrainConfig)",
    # GP's own detector kinds (defense.purification.detector: epic | records | ...), inside GP's module
    ("strategies/gradient_purification.py", "epic", "self.detector"): "defense.purification.detector",
    # the published bucketing table's attack labels (the paper's rows), mapped to config values
    **{("fedepic/reproduce/replays.py", label, "dict"): "a paper's row label"
       for label in ("bit_flip", "label_flip", "ipm", "alie", "mimic")},
}
CHECKED = ("fedepic", "simulations", "strategies")


def _registered_names() -> dict[str, set[str]]:
    """Every registry of fedepic/extensions.py (found there, so a new registry is covered) -> its names."""
    return {value.kind: set(value.names()) for value in vars(ext).values() if isinstance(value, Registry)}


def _subject(operands: list[ast.expr]) -> str:
    """The source of what a registered name is compared with (the operands that are not string literals)."""
    literal = (ast.Constant, ast.Tuple, ast.List, ast.Set)
    return " ".join(ast.unparse(op) for op in operands if not isinstance(op, literal))


def _name_uses(tree: ast.AST, registries: dict[str, set[str]]) -> list[tuple[int, str, str]]:
    """(line, name, subject) of each registered name the code compares as a string (``==``, ``!=``, ``in``
    a literal tuple, list or set, ``"x" in names``), tests as a prefix or suffix (``startswith``,
    ``endswith``), or keys a dispatch table by (a dict literal with two or more names of one registry as
    keys; subject "dict")."""
    names = set().union(*registries.values())
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            subject = _subject([node.left, *node.comparators])
            found += [(node.lineno, s, subject) for s in _compared_strings(node) if s in names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            part, subject = node.args[0].value, ast.unparse(node.func.value)
            test = str.startswith if node.func.attr == "startswith" else str.endswith
            found += [(node.lineno, name, subject) for name in sorted(names) if part and test(name, part)]
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if any(len(keys & registered) >= 2 for registered in registries.values()):
                found += [(node.lineno, k, "dict") for k in sorted(keys & names)]
    return found


def test_no_registered_name_is_compared_by_string_outside_the_registry():
    """The code asks an entry's flags and info, never its name (issue 30): a new rule, attack, protocol,
    dataset or defense is one module plus one registry line. Every name of every registry compared as a
    string, tested as a prefix, or keying a dispatch table in fedepic/, simulations/ or strategies/ fails
    here, unless :data:`ALLOWED_NAMES` lists it with its reason; a stale allowance fails too."""
    registries = _registered_names()
    found, used = [], set()
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == "fedepic/extensions.py":
                continue
            for line, name, subject in _name_uses(ast.parse(path.read_text(), relative), registries):
                if (relative, name, subject) in ALLOWED_NAMES:
                    used.add((relative, name, subject))
                else:
                    found.append(f"{relative}:{line}: {name!r} against {subject}")
    assert not found, f"registered names compared by string (ask the entry's flags instead): {found}"
    assert used == set(ALLOWED_NAMES), f"allowances that no longer match: {sorted(set(ALLOWED_NAMES) - used)}"


def test_the_name_probe_sees_comparisons_prefixes_and_dispatch_tables():
    registries = {"a": {"epic", "mozi", "fang_krum"}, "b": {"none", "mnist"}}
    tree = ast.parse('ok = rule == "mozi" or attack.model.startswith("fang_") or "epic" in names\n'
                     'TITLES = {"mnist": 1, "none": 2}\nRECORD = {"none": 1, "loss": 2}')
    assert sorted(_name_uses(tree, registries)) == [(1, "epic", "names"), (1, "fang_krum", "attack.model"),
                                                    (1, "mozi", "rule"), (2, "mnist", "dict"), (2, "none", "dict")]


def test_the_probe_sees_a_comparison():
    tree = ast.parse('ok = cfg.decentralized.algorithm in ("dsgd", "dsgt") or name == "x"')
    compares = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    assert sorted(s for node in compares for s in _compared_strings(node)) == ["dsgd", "dsgt", "x"]


def _with_algorithm(monkeypatch, name: str, flags: set) -> None:
    """``ALGORITHMS`` plus one entry ``name`` with ``flags`` (the one registry line a new algorithm adds)."""
    entries = [*ext.ALGORITHMS, Entry(name, "fedepic.algorithms.dpsgd:Dpsgd", "a test algorithm",
                                      flags=frozenset(flags))]
    monkeypatch.setattr(ext, "ALGORITHMS", Registry("decentralized algorithm", entries))


def test_a_new_algorithm_line_generates_its_validation(monkeypatch):
    """A one-step algorithm with no momentum (neither ``local_optimizer`` nor ``client_momentum``):
    accepted by name, and every key its flags say it ignores is refused in one line naming it."""
    from fedepic.errors import ConfigError

    _with_algorithm(monkeypatch, "plain", {"one_step", "no_running_stats"})
    run = ["mode=decentralized", "data.name=synthetic", "clients.count=4", "decentralized.algorithm=plain"]
    cfg = load_config(None, [*run, "model.name=mlp", "strategies=[gossip]"])
    assert cfg.decentralized.algorithm == "plain"
    refused = [("train.augment=crop", "train.augment", "decentralized.algorithm=plain takes plain gradient steps"),
               ("clients.local_epochs=2", "clients.local_epochs", "takes one minibatch step per round"),
               ("train.momentum=0.5", "train.momentum", "without momentum: leave it unset"),
               ("train.client_momentum=0.5", "train.client_momentum", "there is no momentum"),
               ("strategies=[gp_epic]", "strategies[0]", "local EPIC selects over epochs")]
    for override, key, why in refused:
        with pytest.raises(ConfigError) as err:
            rule = [] if override.startswith("strategies") else ["strategies=[gossip]"]
            load_config(None, [*run, "model.name=mlp", *rule, override])
        message = str(err.value)
        assert "\n" not in message and f"key '{key}'" in message and why in message, message
    with pytest.raises(ConfigError, match="'model.name': decentralized.algorithm=plain needs a model without"):
        load_config(None, [*run[:1], *run[2:], "strategies=[gossip]", "model.name=resnet18", "data.name=cifar10"])
    with pytest.raises(ConfigError, match="'defense.purification.target': .*under decentralized.algorithm=dsgt only"):
        load_config(None, [*run, "model.name=mlp", "strategies=[gp]", "defense.purification.target=gradient"])


def test_a_new_local_epochs_algorithm_takes_the_local_optimiser(monkeypatch):
    from fedepic.errors import ConfigError

    _with_algorithm(monkeypatch, "local", {"local_optimizer", "tracks_gradient"})
    run = ["mode=decentralized", "data.name=synthetic", "clients.count=4", "decentralized.algorithm=local"]
    cfg = load_config(None, [*run, "model.name=resnet18", "train.augment=crop", "clients.local_epochs=2",
                             "train.momentum=0.5", "strategies=[gp_epic]", "defense.purification.target=gradient"])
    assert (cfg.train.momentum, cfg.clients.local_epochs, ext.purification_target(cfg, {})) == (0.5, 2, "gradient")
    with pytest.raises(ConfigError, match="'train.client_momentum': .*decentralized.algorithm=dsgd; under "
                                          "decentralized.algorithm=local the optimiser's momentum is train.momentum"):
        load_config(None, [*run, "strategies=[gossip]", "train.client_momentum=0.5"])


def readme_example() -> tuple[str, str]:
    """The two python blocks of README.md's "Add a rule": the module and its registry line."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Add a rule", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "README's 'Add a rule' must hold the module and its registry line"
    return blocks[0], blocks[1].strip().rstrip(",")


def test_the_readmes_worked_example_is_one_module_and_one_line(monkeypatch, tmp_path, data_root) -> None:
    """README's example rule, its module and its PEER_RULES line and nothing else, aggregates by its
    formula and runs as a member of a decentralized run (engine=local)."""
    import json
    import sys
    import types

    import torch

    from fedepic.simulate import main
    from strategies.aggregate import aggregate

    code, line = readme_example()
    module = types.ModuleType("strategies.midpoint_median")
    exec(compile(code, "strategies/midpoint_median.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "strategies.midpoint_median", module)
    entry = eval(line, {"Entry": Entry})
    monkeypatch.setitem(ext.PEER_RULES._entries, entry.name, entry)

    rule = ext.PEER_RULES.build("midpoint_median", load_config("dfl_smoke.yaml", []))
    stack = torch.tensor([[0.0, 4.0], [2.0, 0.0], [4.0, 8.0], [10.0, 2.0]])
    out = aggregate(rule, stack, 0)
    assert torch.equal(out.vector, torch.tensor([2.0, 3.0]))  # own (0, 4), neighbours' median (4, 2)
    assert out.kept.tolist() == [True] * 4

    status = main(["config=dfl_smoke.yaml", "engine=local", "strategies=[gossip,midpoint_median]",
                   f"output_dir={tmp_path}", "progress=false", "figures.enabled=false"])
    assert status == 0
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    rows = {r["strategy"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    assert set(rows) == {"gossip", "midpoint_median"}
    assert 0 <= rows["midpoint_median"]["mean_accuracy"] <= 1
    assert rows["midpoint_median"]["mean_accuracy"] != rows["gossip"]["mean_accuracy"]
