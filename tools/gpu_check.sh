#!/usr/bin/env bash
# GPU check, for the device machine's image as it is (python3 3.12 with cupy-cuda13x, torch, transformers 5.17,
# numba, hypothesis, pytest; no network; no array-api-compat / array-api-strict):
#   0. the packages the image lacks come as wheels in .whl/, made here by tools/fetch_gpu_wheels.sh, which runs
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl array-api-compat==1.16.0
#        (and the same for array-api-strict==2.6.1); installed into /tmp/site, put first on PYTHONPATH;
#   1. pytest -m cupy tests/: every layer with CuPy as the namespace against torch on CUDA, whole models on the
#      cupy backend against HF, and the bf16 / int8 GEMV kernels (backends/cupy_kernels.py) against NumPy
#      (tests/test_kernels_cupy.py);
#   2. a short decode timing of the `mid` preset on the GPU: npvlm with float32, bfloat16 and int8 weights and HF
#      float32 on torch CUDA, alternating (tools/bench.py vs-hf --backend cupy).
# From the device tool:  run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Writes gpu_check.log, pytest_cupy.txt and bench_cupy.json into $OUT (./gpu_out without it). About 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
PY="${PYTHON:-python3}"; SITE="${SITE:-/tmp/site}"  # PYTHON, SITE: for a dry run elsewhere
export PYTHONUNBUFFERED=1
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH="$SITE:$PWD:${PYTHONPATH:-}"
  else
    echo "no .whl/ folder: run tools/fetch_gpu_wheels.sh here and carry .whl"; export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  fi
  "$PY" -c "import cupy, torch, transformers, numpy, array_api_compat, array_api_strict; print('cupy', cupy.__version__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| numpy', numpy.__version__, '| array_api_compat', array_api_compat.__version__)"
  timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m cupy -rs tests/ 2>&1 | tee "$out/pytest_cupy.txt"
  echo "cupy tests: exit ${PIPESTATUS[0]}"
  timeout 170 "$PY" tools/bench.py vs-hf --preset mid --backend cupy --weights float32,bfloat16,int8 --rounds 4 \
    --new-tokens 32 --json "$out/bench_cupy.json" 2>&1
  echo "bench: exit $?"
  date
} 2>&1 | tee "$out/gpu_check.log"
