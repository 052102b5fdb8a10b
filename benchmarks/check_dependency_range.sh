#!/usr/bin/env bash
# Is pyproject.toml's range true? Installs the project without the lock into a throw-away venv, with the
# newest releases the ranges allow (default) or the lowest direct ones (--lowest), runs the test suite
# there on the committed tree (HEAD), and prints one JSON line: the commit, the resolution, the versions
# that ran and pytest's closing line.
#
#   bash benchmarks/check_dependency_range.sh [--lowest] [pytest args ...]
#
# Needs uv (in the dev environment: .venv/bin/uv, or $UV) and the package index; the CUDA build of torch
# is a download of about 3 GB. Data: $FEDEPIC_DATA, else ../shared/data is unpacked into .data.
set -euo pipefail
cd "$(dirname "$0")/.."
resolution=highest
if [ "${1:-}" = "--lowest" ]; then
  resolution=lowest-direct
  shift
fi
uv=$(realpath "${UV:-.venv/bin/uv}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 PYTHONUNBUFFERED=1
export FEDEPIC_DATA=${FEDEPIC_DATA:-$(../shared/data/unpack.sh .data | tail -n 1)}
export FEDEPIC_CACHE=$work/decoded-cache
# The committed tree (HEAD), so that edits made while it runs cannot change what is tested.
commit=$(git rev-parse HEAD)
mkdir "$work/src"
git archive HEAD | tar -x -C "$work/src"
cd "$work/src"
# --no-config: the lock's torch pins in [tool.uv] must not apply here.
"$uv" venv -q --no-config --python "$(command -v python3)" "$work/venv" >&2
"$uv" pip install -q --no-config --python "$work/venv/bin/python" --resolution "$resolution" -e ".[dev]" >&2
set +e
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@" > "$work/pytest.log" 2>&1
rc=$?
set -e
tail -n 30 "$work/pytest.log" >&2
"$work/venv/bin/python" - "$resolution" "$rc" "$work/pytest.log" "$commit" <<'EOF'
import json, sys
from importlib.metadata import version

resolution, rc, log, commit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
names = ["torch", "torchvision", "flwr", "ray", "numpy", "numba", "omegaconf", "networkx", "matplotlib", "rich", "pyyaml"]
lines = [line for line in open(log).read().splitlines() if line.strip()]
print(json.dumps({"check": "dependency_range", "commit": commit, "resolution": resolution, "pytest_rc": rc,
                  "pytest": lines[-1] if lines else "", "versions": {n: version(n) for n in names}}))
EOF
exit "$rc"
