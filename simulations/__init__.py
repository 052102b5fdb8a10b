"""The Flower + Ray layer.

Ray reads some settings once, when it is first imported (``ray/_private/ray_constants.py``), so their
defaults are set here, before any module of this package imports ray. A value the user set is kept.

- ``RAY_ENABLE_UV_RUN_RUNTIME_ENV=0``: Ray (2.43 and later) notices a driver started by ``uv run`` and,
  by default, starts every worker through ``uv run`` again in a packaged copy of the working directory
  without ``.venv``: there the workers never start ("worker startup repeatedly failed"), and the README's
  ``uv run`` commands would fail. The workers inherit the driver's environment, ``.venv`` included.
- ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1``: otherwise ``ray.init`` installs absl's failure signal
  handler in the driver over fedepic's (``fedepic.interrupts``), and SIGTERM killed the process ("***
  SIGTERM received ***") instead of stopping the run with a true status. Setting it at run time
  (``flower_runtime.quiet_flower``) came too late wherever ray was already imported: a parallel sweep
  (``simulations.sweep_ray`` imports ray at module level) lost its root summary that way
  (tests/test_sweep.py).
"""

import os

RAY_IMPORT_DEFAULTS = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}

for _key, _value in RAY_IMPORT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
