"""What each mode compares: the columns of its comparison (comparison.csv, one row per member; the
first names the member), the measures its comparison figure draws per round or epoch (panels), and
every per-round measure a member's metrics.jsonl logs that a sweep may draw as curves.

One place, read by the runners (their ``fedepic.lifecycle.Comparison``) and by the sweep, which
aggregates these columns and refuses a ``sweep.metrics`` or ``sweep.curves`` name its mode does not have
before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeColumns:
    columns: tuple[str, ...]  # comparison.csv's header
    panels: tuple[str, ...]  # the comparison figure's measures
    series: tuple[str, ...]  # every per-round (per-epoch) measure of a member's metrics.jsonl


DECENTRALIZED = ModeColumns(
    columns=("strategy", "mean_accuracy", "worst_accuracy", "benign_label_accuracy", "clean_accuracy",
             "exclusive_accuracy", "attack_success", "consensus_distance", "detection_precision", "detection_recall",
             "detected_round", "seconds"),
    panels=("mean_accuracy", "worst_accuracy", "exclusive_accuracy", "consensus_distance", "detection_recall"),
    series=("mean_accuracy", "worst_accuracy", "benign_label_accuracy", "clean_accuracy", "exclusive_accuracy",
            "attack_success", "consensus_distance", "detection_precision", "detection_recall", "train_loss"),
)
# with train.eval_average_model a decentralized run adds, after worst_accuracy, the average model's columns:
# average_accuracy and average_accuracy_<group> per topology.groups entry (fedepic.peer_eval.average_columns)
FEDERATED = ModeColumns(
    columns=("strategy", "final_accuracy", "best_accuracy", "attack_success", "malicious_excluded", "benign_excluded",
             "poison_recall", "failures", "seconds"),
    panels=("accuracy", "attack_success"),
    series=("accuracy", "loss", "attack_success"),
)
CENTRALIZED = ModeColumns(
    columns=("defense", "attack_success", "attack_success_se", "accuracy", "accuracy_se", "seconds", "dropped",
             "poison_recall", "clean_drop_rate", "trials", "brew_alignment", "random_alignment"),
    panels=("test_accuracy",),
    series=("test_accuracy", "loss"),
)
BY_MODE = {"decentralized": DECENTRALIZED, "federated": FEDERATED, "centralized": CENTRALIZED}
