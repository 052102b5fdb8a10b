"""What each logged quantity is, for people: its label, unit, display scale and which way is better.

The figures (fedepic.plots) label their axes with :func:`axis_label`; the HTML report
(fedepic.html_report) formats table cells with :func:`display` and ranks members with
``Quantity.better``. Fractions (accuracies, rates, detection scores) are stored as fractions in
metrics.jsonl, summary.json and comparison.csv, and shown in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

HIGHER, LOWER = "higher", "lower"  # which way a quantity is better; None: neither (a description)


@dataclass(frozen=True)
class Quantity:
    """How a quantity is shown: ``label`` (``unit``: what an axis of it measures), values times ``scale``,
    ``digits`` after the point (or significant digits for magnitudes below 1 without a unit)."""

    label: str
    unit: str = ""
    scale: float = 1.0
    digits: int = 3
    better: Optional[str] = None


def _percent(label: str, better: Optional[str]) -> Quantity:
    return Quantity(label, "%", 100.0, 1, better)


KNOWN: dict[str, Quantity] = {
    # decentralized (over the benign nodes; fedepic.peer_routing.round_metrics)
    "mean_accuracy": _percent("mean accuracy of benign nodes", HIGHER),
    "worst_accuracy": _percent("worst benign node's accuracy", HIGHER),
    "average_accuracy": _percent("accuracy of the benign nodes' average model", HIGHER),
    "benign_label_accuracy": _percent("accuracy on labels benign nodes hold", HIGHER),
    "clean_accuracy": _percent("accuracy on labels the attack leaves alone", HIGHER),
    "exclusive_accuracy": _percent("accuracy on labels only malicious nodes hold", HIGHER),
    "consensus_distance": Quantity("consensus distance to the average model", "mean squared L2", digits=4),
    "detection_precision": _percent("detection precision", HIGHER),
    "detection_recall": _percent("detection recall", HIGHER),
    "detection_f1": _percent("detection F1", HIGHER),
    "detected_round": Quantity("round of full detection", "round", digits=0, better=LOWER),
    "diverged_round": Quantity("first diverged round", "round", digits=0),
    "rounds": Quantity("rounds done", digits=0),
    "train_loss": Quantity("training loss", "cross-entropy", digits=3),
    "per_class": _percent("per-class accuracy", None),
    # federated (global model on the test set; simulations/server_app.py)
    "accuracy": _percent("test accuracy", HIGHER),
    "final_accuracy": _percent("final test accuracy", HIGHER),
    "best_accuracy": _percent("best test accuracy", HIGHER),
    "loss": Quantity("test loss", "cross-entropy", digits=3),
    "malicious_excluded": _percent("malicious updates excluded", HIGHER),
    "benign_excluded": _percent("benign updates excluded", LOWER),
    "failures": Quantity("failed client replies", digits=0, better=LOWER),
    # centralized (fedepic/centralized.py); attack_success is the attack's own measure in every mode
    "attack_success": _percent("attack success", LOWER),
    "test_accuracy": _percent("test accuracy", HIGHER),
    "poison_recall": _percent("poisons dropped (recall)", HIGHER),
    "clean_drop_rate": _percent("clean rows dropped", LOWER),
    "dropped": Quantity("rows dropped", digits=0),
    "trials": Quantity("trials", digits=0),
    "brew_alignment": Quantity("brew alignment", "cosine", digits=3),
    "random_alignment": Quantity("random alignment", "cosine", digits=3),
    # the cost of a member, in every mode
    "seconds": Quantity("time", "s", digits=1, better=LOWER),
    "wall_seconds": Quantity("wall time", "s", digits=1),
}
SE_SUFFIX = "_se"  # comparison columns: "accuracy_se" is the standard error of "accuracy"


def quantity(name: str) -> Quantity:
    """The quantity ``name`` (a metric or comparison column); unknown names are shown as they are."""
    if name in KNOWN:
        return KNOWN[name]
    if name.endswith(SE_SUFFIX) and name[:-len(SE_SUFFIX)] in KNOWN:  # an s.e. has its mean's unit, no ranking
        base = KNOWN[name[:-len(SE_SUFFIX)]]
        return replace(base, label=f"s.e. of {base.label}", better=None)
    if name.endswith("accuracy"):
        return _percent(name.replace("_", " "), HIGHER)
    if name.endswith("seconds"):
        return Quantity(name.replace("_", " "), "s", digits=1)
    return Quantity(name.replace("_", " "))


def axis_label(name: str) -> str:
    """``label (unit)``, e.g. "mean accuracy of benign nodes (%)"."""
    q = quantity(name)
    return f"{q.label} ({q.unit})" if q.unit and q.unit != "round" else q.label


def scaled(name: str, value: Optional[float]) -> float:
    """``value`` in the unit it is shown in (a fraction in percent); None is NaN."""
    if value is None:
        return math.nan
    return float(value) * quantity(name).scale


def display(name: str, value: Any) -> str:
    """A table cell: numbers in the quantity's unit and digits, "" for a missing or NaN value, text as it is."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isnan(value):
        return ""
    q = quantity(name)
    if math.isinf(value):
        return str(value)
    shown = value * q.scale
    if q.digits == 0 or (isinstance(value, int) and q.scale == 1.0):
        return f"{shown:,.0f}"
    if q.unit in ("%", "s", "round") or abs(shown) >= 1:
        return f"{shown:,.{q.digits}f}"
    return f"{shown:.{q.digits}g}"  # small magnitudes (distances, losses): significant digits


def with_unit(name: str, value: Any) -> str:
    """:func:`display` followed by the unit ("65.9 %", "4.2 s"); "n/a" for a missing value."""
    text = display(name, value)
    unit = quantity(name).unit
    if not text:
        return "n/a"
    return f"{text} {unit}" if unit in ("%", "s") else text
