"""Divergence is reported the same way in every mode: non-finite weights or loss, or a collapse to one
predicted class (fedepic.metrics.diverged), in the member's figures, the root summary's ``diverged`` list
and one warning line with the same wording."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedepic.metrics import DIVERGED_MEANS, diverged
from fedepic.train import logit_metrics
from tests.test_resume import cli

LABELS = torch.arange(10).repeat(5)


def test_a_blown_up_constant_prediction_is_a_collapse():
    logits = torch.zeros(len(LABELS), 10)
    logits[:, 3] = 1e4  # finite, one class for everything, loss ~1e4
    result = logit_metrics(logits, LABELS, 10)
    assert result["collapsed"] and math.isfinite(result["loss"])
    assert diverged(True, result)


def test_an_undecided_model_that_predicts_one_class_is_not_a_collapse():
    logits = torch.zeros(len(LABELS), 10)
    logits[:, 3] = 1e-3  # near uniform: loss ~ln 10, as an undertrained model
    assert not logit_metrics(logits, LABELS, 10)["collapsed"]
    varied = torch.nn.functional.one_hot(LABELS, 10).float() * 5  # right on every image
    assert not logit_metrics(varied, LABELS, 10)["collapsed"]
    one_label = torch.full((20,), 4)
    assert not logit_metrics(torch.zeros(20, 10).index_fill_(1, torch.tensor([4]), 1e4), one_label, 10)["collapsed"]


def test_non_finite_weights_or_loss_diverge():
    assert diverged(False)
    assert diverged(True, {"loss": float("nan"), "collapsed": False})
    assert not diverged(True, {"loss": 2.3, "collapsed": False})
    assert not diverged(True, None)


@pytest.mark.parametrize("args,member", [
    (["config=centralized_mnist", "data.train_per_class=30", "data.test_per_class=10"], "none"),
    (["config=server_noniid", "engine=local", "rounds=2", "clients.count=4", "data.train_per_class=20",
      "data.test_per_class=10", "data.partition=iid", "strategies=[fedavg]"], "fedavg"),
    (["config=dfl_smoke", "engine=local", "rounds=2", "strategies=[gossip]"], "gossip"),
], ids=["centralized", "federated", "decentralized"])
def test_lr_1e6_is_reported_as_diverged_in_every_mode(tmp_path: Path, args: list[str], member: str):
    done = cli([*args, "train.lr=1e6", f"output_dir={tmp_path}", "progress=false", "figures.enabled=false"])
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert json.loads((folder / "summary.json").read_text())["diverged"] == [member]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("fedepic: warning:")]
    assert any(line.startswith(f"fedepic: warning: {member} diverged ({DIVERGED_MEANS}) ") for line in warnings), \
        done.stderr[-2000:]


def test_a_collapse_counts_only_when_it_lasts_to_the_last_evaluation():
    """A node trained on one label may predict one class for a while and recover: the member diverged
    only when its last evaluation collapsed, or its models went non-finite (from that round on)."""
    from fedepic.metrics import diverged_from_round
    from simulations.decentralized import member_summary

    recovered = [{"round": 1, "collapsed_nodes": 2, "diverged_nodes": 0}, {"round": 2, "collapsed_nodes": 0,
                                                                             "diverged_nodes": 0}]
    stuck = [{"round": 1, "collapsed_nodes": 0, "diverged_nodes": 0}, {"round": 2, "collapsed_nodes": 1,
                                                                         "diverged_nodes": 0}]
    assert diverged_from_round(member_summary("g", "gossip", recovered)) is None
    assert diverged_from_round(member_summary("g", "gossip", stuck)) == "at the last evaluation"
    nonfinite = [{"round": 1, "collapsed_nodes": 0, "diverged_nodes": 1}, {"round": 2, "collapsed_nodes": 0,
                                                                             "diverged_nodes": 0}]
    assert diverged_from_round(member_summary("g", "gossip", nonfinite)) == "from round 1"


def test_a_failed_download_removes_only_the_empty_folders_it_made(tmp_path):
    from fedepic.data import _removed_on_failure

    root = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with _removed_on_failure(root / "MNIST" / "raw"):
            (root / "MNIST" / "raw").mkdir(parents=True)
            (root / "other").mkdir()  # another process's download beside it
            (root / "other" / "file").write_text("kept")
            raise RuntimeError("no network")
    assert (root / "other" / "file").read_text() == "kept" and not (root / "MNIST").exists()
    with pytest.raises(RuntimeError):
        with _removed_on_failure(tmp_path / "fresh" / "MNIST" / "raw"):
            (tmp_path / "fresh" / "MNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("no network")
    assert not (tmp_path / "fresh").exists()
