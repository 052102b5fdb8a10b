"""The registered replays of ``python -m fedepic.reproduce NAME``: per name, the config it runs, the
published experiment it is compared with (``published.json``), and how each published cell maps to a
fedepic result.

A published cell maps to one number of the replay's sweep folder (:class:`CellMap`): the sweep cells
whose axis values match ``values`` (one per seed), the comparison row of ``member`` in each of them, and
its column ``metric`` (a share, so ``scale`` 100 gives percent). A cell fedepic cannot run yet (a rule,
an attack or a measure it lacks) keeps its intended mapping and says in ``needs`` what is missing: it
is reported as missing, with that text, until its value shows up in a run folder (a config extended
once the feature lands). ``comparable`` set on a replay says why none of its cells can be a
reproduction (a reduced smoke protocol): its rows are printed beside the paper's without a verdict.

Example::

    >>> replay = get("dumbbell")
    >>> replay.config, replay.experiment, replay.seeds
    ('reproduce/dumbbell_clippedgossip.yaml', 'dumbbell_clippedgossip', (0,))
    >>> m = replay.map_cell({"split": "noniid", "aggregator": "trimmed_mean"})
    >>> m.values, m.member, m.metric, m.needs
    ({'data.partition': 'label_sets'}, 'trimmed_mean', 'average_accuracy', None)
    >>> replay.map_cell({"split": "iid", "aggregator": "mozi"})
    CellMap(values={'data.partition': 'iid'}, member='mozi', metric='average_accuracy', scale=100.0, needs=None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from fedepic.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CellMap:
    """Where a published cell's fedepic figure is: the sweep cells with axis ``values`` (all seeds),
    comparison row ``member``, column ``metric`` times ``scale``; ``needs``: what fedepic lacks to run it."""

    values: dict[str, Any]
    member: str
    metric: str
    scale: float = 100.0
    needs: Optional[str] = None


@dataclass(frozen=True)
class Replay:
    """One registered replay (module docstring)."""

    name: str
    about: str
    config: str  # under configs/ (python -m fedepic.simulate config=...)
    experiment: str  # in published.json
    seeds: tuple[int, ...]  # the authors' seeds: the replay's default
    map_cell: Callable[[Mapping[str, str]], CellMap]
    deviations: tuple[str, ...] = ()  # what differs from the published protocol for every cell
    points: float = 2.0  # tolerance: the published std + points ...
    single_seed_points: float = 3.0  # ... or this, where the published figure has one seed
    comparable: Optional[str] = None  # None, or why no cell of this replay can be a reproduction
    path_keys: tuple[str, ...] = field(default=())  # keys (and sweep axes) holding paths relative to the repository

    def config_path(self) -> Path:
        """The replay's config in the repository's ``configs/``; a ConfigError in one line where there is
        none (an installed wheel ships the package, not ``configs/``: the command needs a source checkout)."""
        path = REPO / "configs" / self.config
        if not path.is_file():
            raise ConfigError(f"invalid value {self.name!r} for the replay NAME: python -m fedepic.reproduce needs a "
                              f"source checkout (its config configs/{self.config} is not under {REPO}; an installed "
                              "package ships no configs/): run it from a clone of the repository")
        return path

    def fixed_overrides(self) -> list[str]:
        """Overrides the command adds: the values of ``path_keys`` (in the config and in its sweep axes)
        made absolute, since the config's paths are relative to the repository root and the command
        may run elsewhere (the config is read as plain YAML: loading it would check those paths)."""
        import yaml

        raw = yaml.safe_load(self.config_path().read_text(encoding="utf-8")) or {}
        out = []
        for key in self.path_keys:
            node: Any = raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, str):
                out.append(f"{key}={REPO / node}")
            axis = (raw.get("sweep") or {}).get(key)
            if isinstance(axis, list):
                out.append(f"sweep.{key}=[{','.join(str(REPO / p) for p in axis)}]")
        return out


# --------------------------------------------------------------------------- dumbbell (ClippedGossip)

DUMBBELL_SPLITS = {"iid": "iid", "noniid": "label_sets"}
DUMBBELL_RULES = ("gossip", "scclip", "trimmed_mean", "rfa", "mozi")  # the config's members, by the paper's names


def _dumbbell(key: Mapping[str, str]) -> CellMap:
    if key["aggregator"] not in DUMBBELL_RULES:
        raise KeyError(key["aggregator"])
    return CellMap({"data.partition": DUMBBELL_SPLITS[key["split"]]}, key["aggregator"], "average_accuracy")


# --------------------------------------------------------------------------- bucketing, MNIST

BUCKETING_ATTACKS: dict[str, dict[str, str]] = {
    "bit_flip": {"attack.model": "bit_flip", "attack.data": "none"},
    "label_flip": {"attack.model": "none", "attack.data": "label_flip"},
    "ipm": {"attack.model": "ipm", "attack.data": "none"},
    "alie": {"attack.model": "alie", "attack.data": "none"},
    "mimic": {"attack.model": "mimic", "attack.data": "none"},
}
BUCKETING_RULES = {"krum": ("krum", None), "cm": ("fedmedian", None), "rfa": ("geometric_median", None),
                   "cclip": ("centered_clipping", None)}


def _bucketing(key: Mapping[str, str]) -> CellMap:
    member, needs = BUCKETING_RULES[key["aggregator"]]
    return CellMap(dict(BUCKETING_ATTACKS[key["attack"]]), member, "final_accuracy", needs=needs)


# --------------------------------------------------------------------------- ByzFL's benchmark

BYZFL_ROWS = {"none_avg": ({"attack.model": "none"}, "fedavg"),
              "alie_tm": ({"attack.model": "alie"}, "fedtrimmedavg"),
              "signflip_median": ({"attack.model": "ipm", "attack.ipm_eps": 1.0}, "fedmedian"),
              "ipm_tm_clip_nnm": ({"attack.model": "ipm", "attack.ipm_eps": 2.0}, "fedtrimmedavg")}


def _byzfl(key: Mapping[str, str]) -> CellMap:
    values, member = BYZFL_ROWS[key["row"]]
    return CellMap(dict(values), member, "final_accuracy")


# --------------------------------------------------------------------------- EPIC Table 2, CPU smoke

def _epic_table2(key: Mapping[str, str]) -> CellMap:
    return CellMap({}, key["defense"], key["measure"])


REPLAYS: dict[str, Replay] = {r.name: r for r in (
    Replay("dumbbell", "ClippedGossip (He, Karimireddy, Jaggi 2022), Fig. 4: dumbbell graph, no attack, IID and "
           "non-IID, 5 aggregators", "reproduce/dumbbell_clippedgossip.yaml", "dumbbell_clippedgossip", (0,),
           _dumbbell,
           deviations=("the measure: the average honest model's accuracy (average_accuracy) on all 10,000 test "
                       "images; the authors' on the first 9,984",
                       "model cnn_mnist instead of the authors' Net with dropout",
                       "non-IID rows: label_sets (each label split evenly in its clique) instead of the authors' "
                       "random round-robin deal; minibatches with replacement from all rows instead of the same "
                       "first 960 rows every epoch",
                       "every DEVIATES line of configs/reproduce/dumbbell_clippedgossip.yaml; PROTOCOLS.md 1.8")),
    Replay("bucketing_mnist", "Bucketing (Karimireddy, He, Jaggi, ICLR 2022), MNIST exp3: momentum 0.9, no "
           "bucketing, 4 rules x 5 attacks", "reproduce/bucketing_mnist.yaml", "bucketing_mnist", (0, 1, 2),
           _bucketing,
           deviations=(                       "data: 25 label-sorted shards dealt at random to all clients instead of 3,000 contiguous "
                       "label-sorted rows per honest worker and IID rows for the Byzantine ones",
                       "model cnn_mnist instead of the authors' Net with dropout",
                       "Krum scores squared distances; the authors' code their 4th power",
                       "every DEVIATES line of configs/reproduce/bucketing_mnist.yaml; PROTOCOLS.md 2.8")),
    Replay("byzfl", "ByzFL 0.0.11's benchmark scenario: the four rows of benchmarks/byzfl_compare.py, against "
           "ByzFL's own measured accuracies", "reproduce/byzfl_benchmark.yaml", "byzfl_benchmark", (0,), _byzfl,
           deviations=("the known differences of benchmarks/byzfl_compare.py's docstring: minibatches with "
                       "replacement, each side's own initial weights, fedepic's own normalisation statistics",),
           points=2.0, single_seed_points=2.0, path_keys=("data.partition_file",)),
    Replay("epic_table2_smoke", "EPIC (Yang, Liu, Mirzasoleiman, ICML 2022), Table 2, as the CPU smoke run: "
           "Witches' Brew, no defense vs EPIC-0.1", "reproduce/epic_table2_smoke.yaml", "epic_table2", (0,),
           _epic_table2,
           comparable="a CPU smoke protocol (3 CIFAR-10 classes, small CNN, 5 epochs, eps 16/255, budget 2%, a "
                      "short brew, 2 targets), not Table 2's (CIFAR-10, ResNet-18, 40 epochs, eps 8/255, 1%, "
                      "10 targets; the GPU suite, benchmarks/gpu_suite.sh): its figures cannot match the paper's "
                      "and are not a reproduction"),
)}


def get(name: str) -> Replay:
    """The replay called ``name``; an unknown name is a ConfigError naming it and the choices."""
    if name not in REPLAYS:
        raise ConfigError(f"invalid value {name!r} for the replay NAME: choose one of {', '.join(REPLAYS)}")
    return REPLAYS[name]
