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
import fedepic.topology, fedepic.attacks.model_attacks
from fedepic.outputs import environment_versions
environment_versions()
print('ok')
"""


def test_core_imports_without_flower_or_ray():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
