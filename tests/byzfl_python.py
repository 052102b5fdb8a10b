"""Where the tests find ByzFL's interpreter (a Python with byzfl installed, for the live cross-checks):
``$FEDEPIC_BYZFL_PYTHON``, else ``/tmp/byzfl-venv/bin/python``. A test that needs it skips with
``SKIP_REASON``, which says how to enable it."""

from __future__ import annotations

import os
from pathlib import Path

BYZFL_PYTHON = Path(os.environ.get("FEDEPIC_BYZFL_PYTHON", "/tmp/byzfl-venv/bin/python"))
SKIP_REASON = (f"no ByzFL interpreter at {BYZFL_PYTHON}: set FEDEPIC_BYZFL_PYTHON to a Python with byzfl installed "
               "(python benchmarks/byzfl_compare.py makes one with --venv DIR; DIR/bin/python)")
