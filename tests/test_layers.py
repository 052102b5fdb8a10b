"""The core never imports flwr, ray, strategies or simulations: the centralized path runs without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('flwr', 'ray', 'strategies', 'simulations'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import fedepic.simulate, fedepic.centralized, fedepic.epic, fedepic.attacks, fedepic.defenses, fedepic.outputs
import fedepic.topology, fedepic.attacks.model_attacks, fedepic.lifecycle, fedepic.report
from fedepic.outputs import environment_versions
environment_versions()
print('ok')
"""


def test_core_imports_without_flower_or_ray():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


NO_NUMBA_PROBE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('numba', 'llvmlite'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
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
    proc = subprocess.run(
        [sys.executable, "-c", NO_NUMBA_PROBE], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


SEQUENTIAL_PROBE = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('flwr', 'ray'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from fedepic.config import load_config
from simulations.dfl_sequential import run_sequential
cfg = load_config(None, ['mode=decentralized', 'data.name=synthetic', 'data.synthetic_train=200',
                         'data.synthetic_test=50', 'clients.count=4', 'clients.malicious_ids=[0]', 'rounds=1',
                         'model.name=mlp', 'topology.name=complete', 'strategies=[gp]', 'attack.data=label_flip'])
records = run_sequential(cfg, 'gp')
assert len(records) == 1 and 0.0 <= records[0]['mean_accuracy'] <= 1.0
print('ok')
"""


def test_the_in_process_decentralized_loop_runs_without_flower_or_ray():
    """simulations/dfl_sequential.py: the same node and router code as the Flower run, importing neither."""
    proc = subprocess.run([sys.executable, "-c", SEQUENTIAL_PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


CORE_MODULES = ("fedepic.lifecycle", "fedepic.report", "fedepic.builders", "fedepic.registry", "fedepic.extensions",
                "fedepic.checkpoint", "fedepic.metrics")


def test_new_core_modules_import_without_flower_or_ray():
    probe = PROBE.replace("import fedepic.topology, fedepic.attacks.model_attacks",
                          "import fedepic.topology, fedepic.attacks.model_attacks, " + ", ".join(CORE_MODULES))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
