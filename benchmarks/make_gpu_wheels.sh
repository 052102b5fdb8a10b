#!/usr/bin/env bash
# Prepare, on a machine with a package index, what benchmarks/gpu_suite.sh carries to a GPU machine that
# reaches none: the lock's wheels for the GPU machine's Python (hash-checked against uv.lock)
# in .wheels/, and a copy of the CIFAR-10 JPEG archive in .carry/data/ (../shared does not travel).
#
#   bash benchmarks/make_gpu_wheels.sh                  # suite profile, Python 3.12 (the H200 image's)
#   PROFILE=lock DEST=/tmp/lock-wheels SKIP= bash benchmarks/make_gpu_wheels.sh   # size of the whole lock
#
# Both folders are git-ignored; carry them as [".wheels", ".carry"] (64 MiB in all, with the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=${PYVER:-3.12.3}
PROFILE=${PROFILE:-suite}
DEST=${DEST:-.wheels}
SKIP=${SKIP-numba,llvmlite}
mkdir -p "$DEST"
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || UV=uv
"$UV" export -q --frozen --extra dev --no-default-groups --no-emit-project --format requirements-txt -o "$DEST/lock.txt"
"$PY" benchmarks/gpu_wheels.py --lock "$DEST/lock.txt" --profile "$PROFILE" --python "$PYVER" --skip "$SKIP" \
    > "$DEST/requirements.txt"
platforms=()
for n in 2_17 2_27 2_28 2_31 2_34 2_35 2_39; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes \
    --python-version "${PYVER%.*}" --implementation cp --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${platforms[@]}" -d "$DEST" -r "$DEST/requirements.txt"
if [ "$DEST" = .wheels ]; then
  mkdir -p .carry/data
  shared=../shared/data
  [ -f "$shared/cifar10-jpeg.tar.gz" ] || shared=/work/shared/data
  cp "$shared/cifar10-jpeg.tar.gz" .carry/data/
  grep ' cifar10-jpeg.tar.gz$' "$shared/SHA256SUMS" > .carry/data/SHA256SUMS
  (cd .carry/data && sha256sum --quiet -c SHA256SUMS)
fi
echo "make_gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $DEST"
[ "$DEST" != .wheels ] || echo "make_gpu_wheels: carry .wheels and .carry: $(du -cb .wheels .carry | tail -1 | cut -f1) bytes"
