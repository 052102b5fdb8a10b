"""The core never imports flwr, ray or simulations. The centralized path runs without strategies/ too;
the decentralized core (fedepic/peer_*.py) calls the pure-torch peer rules there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def blocking(*packages: str) -> str:
    """A script prologue under which importing any of ``packages`` fails."""
    return ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {packages!r}:\n            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n")


PROBE = blocking('flwr', 'ray', 'strategies', 'simulations') + """
import fedepic.simulate, fedepic.centralized, fedepic.epic, fedepic.attacks, fedepic.defenses, fedepic.outputs
import fedepic.topology, fedepic.attacks.model_attacks, fedepic.lifecycle, fedepic.report
from fedepic.outputs import environment_versions
environment_versions()
print('ok')
"""


def run_probe(script: str) -> None:
    """Run ``script`` in a fresh interpreter (its import blocks must not leak into this one); it prints ok."""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_core_imports_without_flower_or_ray():
    run_probe(PROBE)


NO_NUMBA_PROBE = blocking('numba', 'llvmlite') + """
import torch
from fedepic.epic import select_medoids
x, y = torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), torch.arange(200) % 3
auto = select_medoids(x, y, 0.1)
assert torch.equal(auto.medoids, select_medoids(x, y, 0.1, backend='torch').medoids)
try:
    select_medoids(x, y, 0.1, backend='compiled')
except ValueError as err:
    assert 'numba' in str(err)
else:
    raise AssertionError('compiled backend without numba')
print('ok')
"""


def test_selection_runs_without_numba():
    """numba is optional: the GPU machine has only torch and torchvision."""
    run_probe(NO_NUMBA_PROBE)


# the decentralized mode's core: its nodes, routing, evaluation and in-process backends (the peer rules
# they call live in strategies/, pure torch, so only flwr, ray and simulations are blocked here)
PEER_MODULES = ("fedepic.peer_rounds", "fedepic.peer_node", "fedepic.peer_routing", "fedepic.peer_eval",
                "fedepic.peer_local", "fedepic.peer_stacked", "fedepic.algorithms", "fedepic.algorithms.dpsgd",
                "fedepic.algorithms.dsgd", "fedepic.algorithms.dsgt")

SEQUENTIAL_PROBE = blocking('flwr', 'ray', 'simulations') + """
import """ + ", ".join(PEER_MODULES) + """
from fedepic.config import load_config
from fedepic.peer_local import run_sequential
cfg = load_config(None, ['mode=decentralized', 'data.name=synthetic', 'data.synthetic_train=200',
                         'data.synthetic_test=50', 'clients.count=4', 'clients.malicious_ids=[0]', 'rounds=1',
                         'model.name=mlp', 'topology.name=complete', 'strategies=[gp]', 'attack.data=label_flip'])
records = run_sequential(cfg, 'gp')
assert len(records) == 1 and 0.0 <= records[0]['mean_accuracy'] <= 1.0
print('ok')
"""


def test_the_in_process_decentralized_loop_runs_without_flower_or_ray():
    """fedepic/peer_local.py: the same node and router code as the Flower run, importing neither (nor
    anything of simulations/)."""
    run_probe(SEQUENTIAL_PROBE)


CORE_MODULES = ("fedepic.lifecycle", "fedepic.report", "fedepic.builders", "fedepic.registry", "fedepic.extensions",
                "fedepic.checkpoint", "fedepic.metrics", "fedepic.plots", "fedepic.quantities", "fedepic.html_report",
                "fedepic.sweep.plan", "fedepic.sweep.cells", "fedepic.sweep.aggregate", "fedepic.sweep.report",
                "fedepic.sweep.run", "fedepic.sweep.page", "fedepic.columns", "fedepic.stacked_fit",
                # the server-based round engine and its in-process backend
                "fedepic.server_rounds", "fedepic.local_backend", "fedepic.client_work", "fedepic.client_data",
                "fedepic.server_checkpoints", "fedepic.failures", "fedepic.member_loop", "fedepic.seeds")


def test_new_core_modules_import_without_flower_or_ray():
    probe = PROBE.replace("import fedepic.topology, fedepic.attacks.model_attacks",
                          "import fedepic.topology, fedepic.attacks.model_attacks, " + ", ".join(CORE_MODULES))
    run_probe(probe)


ENGINE_PROBE = blocking('flwr', 'ray') + """
import threading, tempfile
from fedepic.config import load_config
from fedepic.data import load_dataset
from fedepic.client_data import build_client_data, client_partition
from fedepic.local_backend import LocalServerBackend
from fedepic.server_rounds import Evaluator, MemberResult, Target, run_member
from fedepic.outputs import RunWriter
from fedepic.builders import build_model
import torch
out = tempfile.mkdtemp()
cfg = load_config(None, ['mode=federated', 'engine=local', 'data.name=synthetic', 'data.synthetic_train=200',
                         'data.synthetic_test=50', 'clients.count=4', 'clients.malicious_ids=[0]', 'rounds=2',
                         'model.name=mlp', 'attack.model=alie', 'strategies=[krum]', 'defense.pre_aggregation=[clip]'])
data = load_dataset(cfg.data, cfg.seed)
parts = client_partition(cfg, data)
backend = LocalServerBackend(cfg, 'krum', data, [build_client_data(cfg, data, c, parts) for c in range(4)])
initial = build_model(cfg, data, cfg.seed, torch.device('cpu')).state_dict()
result = MemberResult()
with RunWriter(out, 'probe') as writer:
    run_member(cfg, 'krum', backend, initial, Evaluator(cfg, data, Target()), writer, threading.Event(), result,
               lambda *a: None)
assert len(result.curves['accuracy']) == 2 and result.row['strategy'] == 'krum'
print('ok')
"""


def test_the_server_round_engine_runs_without_flower_or_ray():
    """fedepic/server_rounds.py with the in-process backend: rounds of a robust rule with an
    omniscient attack and pre-aggregation, importing neither Flower nor Ray (the rules in strategies/
    are pure torch)."""
    run_probe(ENGINE_PROBE)
