"""The core never imports flwr, ray, strategies or simulations: the centralized path runs without them."""

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


SEQUENTIAL_PROBE = blocking('flwr', 'ray') + """
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
    run_probe(SEQUENTIAL_PROBE)


CORE_MODULES = ("fedepic.lifecycle", "fedepic.report", "fedepic.builders", "fedepic.registry", "fedepic.extensions",
                "fedepic.checkpoint", "fedepic.metrics", "fedepic.plots", "fedepic.quantities", "fedepic.html_report",
                "fedepic.sweep.plan", "fedepic.sweep.cells", "fedepic.sweep.aggregate", "fedepic.sweep.report",
                "fedepic.sweep.run", "fedepic.sweep.page", "fedepic.columns", "fedepic.stacked_fit")


def test_new_core_modules_import_without_flower_or_ray():
    probe = PROBE.replace("import fedepic.topology, fedepic.attacks.model_attacks",
                          "import fedepic.topology, fedepic.attacks.model_attacks, " + ", ".join(CORE_MODULES))
    run_probe(probe)
