#!/usr/bin/env bash
# CPU dry run of benchmarks/gpu_suite.sh, so that GPU minutes go to measuring: every part on the CPU, parts
# 3-5 on configs/centralized_smoke.yaml reduced further (40 images a class, 3 epochs, 1 restart of 3 brew
# steps), 2 targets, probe 1,2, bench_epic on 1000 rows a class.
#
#   bash benchmarks/gpu_suite_dryrun.sh [BUDGET=300] [OUT=runs/gpu-suite-dryrun]
#   BARE=1 bash benchmarks/gpu_suite_dryrun.sh ...   # as on a GPU machine: a fresh venv holding only torch,
#                                                     # torchvision and their needs (linked from .venv), the rest
#                                                     # installed offline from wheels for this Python
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-300}
out=${2:-runs/gpu-suite-dryrun}
work=/tmp/fedepic-dryrun-work
rm -rf "$work" "$out"
py=${PY:-.venv/bin/python}
wheels=.wheels
if [ "${BARE:-0}" = 1 ]; then
  bare=/tmp/fedepic-bare
  pyver=$($py -c 'import platform; print(platform.python_version())')
  wheels=$bare/wheels
  rm -rf "$bare" && "$($py -c 'import sys; print(sys._base_executable)')" -m venv "$bare/venv" && mkdir -p "$bare/site"
  $py - "$bare/site" <<'PY'
import os, re, sys
from importlib import metadata
keep = re.compile(r"^(torch|torchvision|numpy|pillow|filelock|typing[-_]extensions|sympy|mpmath|networkx|jinja2|"
                  r"markupsafe|fsspec|triton|setuptools|nvidia-.*|cuda-.*)$", re.I)
for dist in metadata.distributions():
    if keep.match(dist.metadata["Name"]):
        for top in {str(f).split("/")[0] for f in dist.files or []} - {".."}:
            src, dst = os.path.join(str(dist.locate_file("")), top), os.path.join(sys.argv[1], top)
            if os.path.exists(src) and not os.path.lexists(dst) and not top.endswith(".pth"):
                os.symlink(src, dst)
PY
  "$bare/venv/bin/python" -c 'import sys; print(sys.argv[1])' "$bare/site" \
    > "$("$bare/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/bare.pth"
  PYVER=$pyver DEST=$wheels bash benchmarks/make_gpu_wheels.sh > /dev/null
  py=$bare/venv/bin/python
fi
env -u FEDEPIC_DATA -u FEDEPIC_CACHE -u PYTHONPATH PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PY="$py" SUITE_WHEELS="$wheels" SUITE_DEVICE=cpu \
  SUITE_WORK="$work" SUITE_DATA=/tmp/fedepic-dryrun-data SUITE_CONFIG=centralized_smoke \
  SUITE_SET="data.train_per_class=40 data.test_per_class=20 train.epochs=3 train.milestones=[2] attack.pretrain_epochs=2 attack.restarts=1 attack.steps=3 train.threads=1 defense.epic.warmup=1 defense.epic.interval=1" \
  SUITE_TARGETS="${TARGETS:-2}" SUITE_PROBE=1,2 SUITE_PROBE_STEPS=2 SUITE_PREVIOUS="${PREVIOUS:-none}" \
  SUITE_EPIC_ARGS="--naive-classes 0 --repeats 1 --torch-repeats 0 --threads 1 --rows 1000" \
  bash benchmarks/gpu_suite.sh "$budget" "$out"
echo "gpu_suite_dryrun: $out/suite.jsonl"
cut -c1-160 "$out/suite.jsonl"
