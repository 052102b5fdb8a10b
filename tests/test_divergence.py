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
