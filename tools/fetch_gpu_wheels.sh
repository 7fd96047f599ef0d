#!/usr/bin/env bash
# Download here, into .whl/ (git-ignored: see .gitignore), the pure-Python packages that tools/gpu_check.sh needs
# and the GPU machine's image lacks (its KINDS list: cupy-cuda13x, torch, transformers, numba, hypothesis and
# pytest are there; array-api-compat and array-api-strict are not), for its Python 3.12 on x86-64. The device
# tool carries the folder: run(command="bash tools/gpu_check.sh", carry=[".whl"]). Pure-Python wheels, ~0.4 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="array-api-compat==1.16.0 array-api-strict==2.6.1"  # npvlm's namespace shim; the test grid's strict namespace
rm -rf .whl && mkdir -p .whl
for spec in $WHEELS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl
