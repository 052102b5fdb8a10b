"""Each optimisation key means one thing in every mode, and is refused where it would not act.

- ``train.momentum``, ``train.nesterov``: the local optimiser (local epochs, dpsgd, centralized);
- ``train.client_momentum``: the client momentum of the one-step protocols (per_step, dsgd);
- ``train.weight_decay``: the clients' L2 (the local optimiser; inside the gradient under dsgd, dsgt);
- ``server.weight_decay``: the L2 of the per-step server step;
- ``train.sampler``, ``train.batches_per_epoch``: the minibatches of the one-step protocols (per_step,
  dsgd, dsgt; tests/test_minibatches.py).

What each key does where it acts is tested by hand-computed runs: tests/test_server_per_step.py
(per_step: client momentum and server weight decay), tests/test_dsgt_gp.py (dsgd: client momentum).
"""

from __future__ import annotations

import pytest

from fedepic.config import load_config
from fedepic.errors import ConfigError
from tests.test_bad_inputs import _run, _tree, assert_one_line

PER_STEP = ["mode=federated", "server.protocol=per_step", "model.name=mlp"]
LOCAL_EPOCHS = ["mode=federated"]
CENTRALIZED = ["mode=centralized"]
DPSGD = ["mode=decentralized", "strategies=[gossip]"]
DSGD_RUN = ["mode=decentralized", "decentralized.algorithm=dsgd", "model.name=mlp"]
DSGD = [*DSGD_RUN, "strategies=[gossip]"]
DSGT = ["mode=decentralized", "decentralized.algorithm=dsgt", "model.name=mlp", "strategies=[gossip]"]
SMALL = ["data.name=synthetic", "clients.count=4"]

REFUSED = [
    # the local optimiser's momentum under the one-step protocols
    ("per_step", PER_STEP, "train.momentum=0.5", "train.client_momentum"),
    ("per_step", PER_STEP, "train.nesterov=false", "train.client_momentum"),
    ("dsgd", DSGD, "train.momentum=0.5", "train.client_momentum"),
    ("dsgd", DSGD, "train.nesterov=false", "train.client_momentum"),
    ("dsgt", DSGT, "train.momentum=0", "without momentum"),
    ("dsgt", DSGT, "train.nesterov=false", "without momentum"),
    # the client momentum where training has the local optimiser, or no momentum
    ("local_epochs", LOCAL_EPOCHS, "train.client_momentum=0.5", "train.momentum"),
    ("dpsgd", DPSGD, "train.client_momentum=0.5", "train.momentum"),
    ("centralized", CENTRALIZED, "train.client_momentum=0.5", "train.momentum"),
    ("dsgt", DSGT, "train.client_momentum=0", "no momentum"),
    # the clients' L2 where the server applies it
    ("per_step", PER_STEP, "train.weight_decay=1e-4", "server.weight_decay"),
    # the server's L2 outside federated per_step
    ("local_epochs", LOCAL_EPOCHS, "server.weight_decay=1e-4", "train.weight_decay"),
    ("centralized", CENTRALIZED, "server.weight_decay=1e-4", "train.weight_decay"),
    ("dpsgd", DPSGD, "server.weight_decay=1e-4", "train.weight_decay"),
    ("dsgd", DSGD, "server.weight_decay=1e-4", "train.weight_decay"),
    ("dsgt", DSGT, "server.weight_decay=1e-4", "train.weight_decay"),
    # the one-step protocols' minibatch order where no one-step gradient is taken
    ("local_epochs", LOCAL_EPOCHS, "train.sampler=in_order", "server.protocol=per_step"),
    ("dpsgd", DPSGD, "train.sampler=in_order", "no one-step gradients"),
    ("centralized", CENTRALIZED, "train.batches_per_epoch=30", "no one-step gradients"),
]


@pytest.mark.parametrize("setting,mode,override,hint", REFUSED, ids=[f"{c[0]}-{c[2]}" for c in REFUSED])
def test_a_key_set_where_it_does_not_act_is_refused(setting, mode, override, hint):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, *mode, override])
    message = str(err.value)
    assert "\n" not in message and message.startswith("invalid value "), message
    assert f"key '{key}'" in message, message
    assert hint in message, message


LOCAL_OPTIMISER = {"train.momentum": 0.5, "train.nesterov": False, "train.weight_decay": 0.0}
ACCEPTED = [
    ("per_step", PER_STEP, {"train.client_momentum": 0.5, "server.weight_decay": 1e-4, "train.sampler": "in_order"}),
    ("dsgd", DSGD, {"train.client_momentum": 0.5, "train.weight_decay": 1e-4, "train.sampler": "in_order",
                    "train.batches_per_epoch": 30}),
    ("dsgt", DSGT, {"train.weight_decay": 0.0, "train.sampler": "in_order"}),
    ("dpsgd", DPSGD, LOCAL_OPTIMISER),
    ("local_epochs", LOCAL_EPOCHS, LOCAL_OPTIMISER),
    ("centralized", CENTRALIZED, LOCAL_OPTIMISER),
]


@pytest.mark.parametrize("setting,mode,values", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_each_key_is_accepted_where_it_acts(setting, mode, values):
    cfg = load_config(None, [*SMALL, *mode, *(f"{k}={str(v).lower()}" for k, v in values.items())])
    for key, value in values.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key


def test_the_defaults_are_accepted_everywhere():
    """Defaults mean "not set": a config that sets none of these keys loads in every mode."""
    for mode in (PER_STEP, LOCAL_EPOCHS, CENTRALIZED, DPSGD, DSGD, DSGT):
        cfg = load_config(None, [*SMALL, *mode])
        assert (cfg.train.momentum, cfg.train.client_momentum, cfg.server.weight_decay) == (0.9, 0.9, 0.0)


def test_a_variant_that_sets_the_local_momentum_under_dsgd_is_refused():
    with pytest.raises(ConfigError, match=r"key 'train.momentum'.*train.client_momentum.*\(in variants.v\)"):
        load_config(None, [*SMALL, *DSGD_RUN, "strategies=[v]",
                           "variants={v: {strategy: gossip, train: {momentum: 0}}}"])


def test_a_variant_may_set_the_client_momentum_under_dsgd():
    cfg = load_config(None, [*SMALL, *DSGD_RUN, "strategies=[v]",
                             "variants={v: {strategy: gossip, train: {client_momentum: 0.5}}}"])
    assert cfg.variants["v"]["train"]["client_momentum"] == 0.5


def test_the_cli_refuses_the_old_per_step_keys_with_exit_2_and_one_line(tmp_path, data_root):
    """The run a pre-split per-step command would have been: refused before anything is written, naming
    the key and the one that replaced it."""
    before = _tree(tmp_path)
    proc = _run(tmp_path, data_root, ["mode=federated", "server.protocol=per_step", "model.name=mlp",
                                      "train.weight_decay=1e-4"], {})
    assert_one_line(proc.returncode, proc.stderr, ["train.weight_decay", "server.weight_decay"])
    assert _tree(tmp_path) == before
