"""The registries (fedepic/extensions.py): every entry binds to a config, no class default can differ
from the schema's, the config accepts exactly the registered names, and the generated config reference
(docs/reference/config.md, fedepic.config_reference) lists them."""

from __future__ import annotations

import inspect

import pytest

from fedepic import extensions as ext
from fedepic.config import load_config
from fedepic.registry import Entry, Registry

REGISTRIES = [ext.PEER_RULES, ext.SERVER_STRATEGIES, ext.SERVER_RULES, ext.PRE_AGGREGATION, ext.MODEL_ATTACKS,
              ext.DATA_ATTACKS, ext.CENTRAL_DEFENSES, ext.DATASETS, ext.MODELS]
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
