"""The Flower + Ray layer.

Ray (2.43 and later) notices a driver started by ``uv run`` and, by default, starts every worker through
``uv run`` again in a packaged copy of the working directory without ``.venv``: there the workers never
start ("worker startup repeatedly failed"), and the README's ``uv run`` commands would fail. Ray reads
``RAY_ENABLE_UV_RUN_RUNTIME_ENV`` once, when it is first imported, so the default is set here, before
any module of this package imports ray; the workers inherit the driver's environment, ``.venv``
included. A value the user set is kept.
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
