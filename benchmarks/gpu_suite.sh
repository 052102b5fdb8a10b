#!/usr/bin/env bash
# The GPU measurements of issue 18 in one command, within BUDGET seconds of wall-clock (setup included):
#
#   bash benchmarks/gpu_suite.sh BUDGET [OUT]          # OUT defaults to $OUT, else gpu-suite-out
#
#   0 setup: install what the machine lacks from .wheels/ (no index), unpack CIFAR-10 (JPEG copy)
#   1 the CUDA tests (test_cpu_and_cuda_agree and the backend check)
#   2 benchmarks/bench_epic.py --device cuda (target <= 0.2 s)
#   3 the 40-epoch ResNet-18 run on clean CIFAR-10 (target <= 3 min): table2.py pretrain, whose model the
#     brews of parts 4 and 5 use
#   4 one Witches' Brew poison set, target 0 (target <= 3 min): table2.py brew
#   5 Table 2 (none, EPIC-0.1): table2.py run, concurrency probed (1, 2, 4, 8), with the time left
#
# Each part appends one JSON line to OUT/suite.jsonl as soon as it ends (status, seconds, its result) and
# its output to OUT/suite.log; parts 3-5 write OUT/table2.jsonl, OUT/table2-epochs.jsonl, OUT/table2.md as
# they go, and OUT/poisons.tar the brewed poison sets (untar it into .carry/table2-work/ to carry them to a
# later run, which then trains victims without brewing again). A part that cannot start with 10 s left is skipped; one still running when its time is up is
# stopped (SIGTERM, then SIGKILL after 10 s), so a timeout keeps everything finished before it.
# Beforehand, on a machine with an index: bash benchmarks/make_gpu_wheels.sh, then carry .wheels and .carry.
# Overrides (the CPU dry run sets them): SUITE_DEVICE (cuda), SUITE_CONFIG (centralized_cifar10), SUITE_SET
# (extra config overrides), SUITE_TARGETS (10), SUITE_PROBE (1,2,4,8), SUITE_PROBE_STEPS (100),
# SUITE_PARTS (1,2,3,4,5), SUITE_ORDER (brews-first: the clean model stays on the machine, so a run brews every
# target before it trains; targets-first finishes targets in order), SUITE_EPIC_ARGS, SUITE_WORK, SUITE_DATA, SUITE_WHEELS (.wheels), SUITE_PREVIOUS
# (an earlier run's table2.jsonl, default benchmarks/table2-gpu.jsonl if present: its targets are kept and
# new ones appended), PY (python3).
set -uo pipefail
budget=${1:?usage: bash benchmarks/gpu_suite.sh BUDGET_SECONDS [OUT]}
start=$(date +%s)
out_arg=${2:-${OUT:-gpu-suite-out}}
mkdir -p "$out_arg" && OUT=$(cd "$out_arg" && pwd)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${SUITE_DEVICE:-cuda}
CONFIG=${SUITE_CONFIG:-centralized_cifar10}
read -r -a SET <<< "data.name=imagefolder train.device=$DEVICE ${SUITE_SET:-}"
PARTS=${SUITE_PARTS:-1,2,3,4,5}
WORK=${SUITE_WORK:-/tmp/fedepic-gpu-work}
DATA=${SUITE_DATA:-/tmp/fedepic-gpu-data}
WHEELS=${SUITE_WHEELS:-.wheels}
PREVIOUS=${SUITE_PREVIOUS:-benchmarks/table2-gpu.jsonl}
read -r -a EPIC_ARGS <<< "${SUITE_EPIC_ARGS:---naive-classes 0 --repeats 5}"
RESERVE=10
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
lines=$OUT/suite.jsonl log=$OUT/suite.log current=$OUT/current.out
left() { echo $((start + budget - $(date +%s))); }
since() { echo "$((($(date +%s%N) - $1) / 1000000))e-3"; }  # seconds since a date +%s%N

record() {  # record PART RC SECONDS [RESULT_FILE]: one JSON line (the part's last JSON line is its result)
  "$PY" - "$@" >> "$lines" <<'PY'
import json, re, sys
part, rc, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
text = open(sys.argv[4]).read() if len(sys.argv) > 4 else ""
status = {0: "ok", 124: "timed_out", 137: "timed_out", 125: "skipped"}.get(rc, "failed")
line = {"part": part, "status": status, "rc": rc, "seconds": round(seconds, 1)}
results = [l for l in text.splitlines() if l.startswith("{")]
if results:
    try:
        line["result"] = json.loads(results[-1])
    except ValueError:
        pass
tail = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
if tail:
    line["pytest"] = tail[-1].strip("= ")
print(json.dumps(line))
PY
}

part() {  # part NAME CAP CMD...: run CMD for at most min(CAP, time left - RESERVE) seconds
  local name=$1 cap=$2 t rc began
  shift 2
  t=$(($(left) - RESERVE))
  ((t > cap)) && t=$cap
  if ((t < 10)); then
    echo "== $name: skipped, $(left) s left" >> "$log"
    record "$name" 125 0
    return
  fi
  echo "== $name ($t s): $*" >> "$log"
  began=$(date +%s%N)
  timeout -k 10 "$t" "$@" > "$current" 2>> "$log"
  rc=$?
  cat "$current" >> "$log"
  record "$name" "$rc" "$(since "$began")" "$current"
  rm -f "$current"
}

want() { [[ ",$PARTS," == *",$1,"* ]]; }

# ---- 0: setup
began=$(date +%s%N)
{
  echo "== setup"
  if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r benchmarks/gpu_requirements.txt; then
    echo "setup: installing into the environment failed; trying --target /tmp/fedepic-site"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target /tmp/fedepic-site \
        -r benchmarks/gpu_requirements.txt && export PYTHONPATH=$PYTHONPATH:/tmp/fedepic-site
  fi
  if [ -n "${FEDEPIC_DATA:-}" ] && [ -d "$FEDEPIC_DATA/cifar10-jpeg/test/truck" ]; then
    :
  elif [ -x ../shared/data/unpack.sh ]; then
    FEDEPIC_DATA=$(../shared/data/unpack.sh "$DATA" | tail -n 1)
  elif [ -x shared/data/unpack.sh ]; then
    FEDEPIC_DATA=$(shared/data/unpack.sh "$DATA" | tail -n 1)
  elif [ -f .carry/data/cifar10-jpeg.tar.gz ]; then  # carried: ../shared does not travel to a device machine
    (cd .carry/data && sha256sum --quiet -c SHA256SUMS) && mkdir -p "$DATA" \
      && { [ -d "$DATA/cifar10-jpeg/test/truck" ] || tar -xzf .carry/data/cifar10-jpeg.tar.gz -C "$DATA"; } \
      && FEDEPIC_DATA=$(cd "$DATA" && pwd)
  fi
} >> "$log" 2>&1
export FEDEPIC_DATA=${FEDEPIC_DATA:-} FEDEPIC_CACHE=${FEDEPIC_CACHE:-$DATA/cache}
"$PY" - "$(since "$began")" >> "$lines" 2>> "$log" <<'PY'
import json, os, platform, sys
from importlib import metadata
line = {"part": "setup", "seconds": round(float(sys.argv[1]), 1), "python": platform.python_version(),
        "data": os.environ.get("FEDEPIC_DATA") or None, "cpu_count": os.cpu_count()}
versions = {}
for name in ("torch", "torchvision", "numpy", "omegaconf", "pyyaml", "rich", "matplotlib", "pytest", "numba"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
line["versions"] = versions
try:
    import torch
    line["cuda"] = torch.cuda.is_available()
    line["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import fedepic.centralized  # noqa: F401  everything the parts import
    line["status"] = "ok" if line["data"] else "failed: no CIFAR-10 copy found"
except Exception as err:  # one line, and the parts below fail on their own
    line["status"] = f"failed: {type(err).__name__}: {err}"
print(json.dumps(line))
PY

# ---- 1-5
want 1 && part cuda_tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_epic.py \
    -k "cuda or backend_argument_is_checked"
want 2 && part bench_epic 180 "$PY" benchmarks/bench_epic.py --device "$DEVICE" "${EPIC_ARGS[@]}"
common=(--config "$CONFIG" "${SET[@]}" --out "$OUT" --work "$WORK")
mkdir -p "$WORK"
[ -d .carry/table2-work ] && cp -n .carry/table2-work/* "$WORK"/ 2>/dev/null  # poisons of an earlier run
keep_poisons() {  # the brewed sets come back as one file (10 sets: 15 MB), for a later run to carry
  (cd "$WORK" && ls poisons-trial*.npz > /dev/null 2>&1 && tar -cf "$OUT/poisons.tar" poisons-trial*)
}
want 3 && part pretrain 100000 "$PY" benchmarks/table2.py pretrain "${common[@]}"
if want 4 && [ -f "$WORK/poisons-trial0.npz" ]; then
  echo "== brew: skipped, target 0's poisons were carried" >> "$log"
  record brew 125 0
elif want 4; then
  part brew 100000 "$PY" benchmarks/table2.py brew --targets 1 --first-target 0 "${common[@]}"
fi
keep_poisons
if want 5; then
  previous=()
  [ -f "$PREVIOUS" ] && previous=(--previous "$PREVIOUS")
  # table2.py stops itself at its budget (and on SIGTERM) with a summary; the timeout is the backstop
  t2budget=$(($(left) - RESERVE - 20))  # 20 s for its imports and its summary
  ((t2budget < 20)) && t2budget=0        # too little: part() records it as skipped
  part table2 $((t2budget ? t2budget + 15 : 0)) "$PY" benchmarks/table2.py run --budget "$t2budget" \
      --targets "${SUITE_TARGETS:-10}" --probe "${SUITE_PROBE:-1,2,4,8}" --order "${SUITE_ORDER:-brews-first}" \
      --probe-steps "${SUITE_PROBE_STEPS:-100}" "${previous[@]}" "${common[@]}"
  keep_poisons
fi
echo "== done, $(left) s of $budget left" >> "$log"
