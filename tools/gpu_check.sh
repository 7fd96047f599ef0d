#!/usr/bin/env bash
# GPU check: the test suite with CuPy as a namespace (layer tests against torch on CUDA too),
# then the side-by-side benchmark. For a GPU machine whose image already has cupy, torch and
# transformers and no network. Log goes to $OUT (when set) or ./gpu_out. Target: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 NPVLM_TEST_CUPY=1
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  timeout 330 python -m pytest -q -x tests/test_nn.py tests/test_properties.py tests/test_backends.py tests/test_model_hf.py tests/test_generate.py -k "cupy or not strict" 2>&1
  echo "tests exit $?"
  if [ -f tools/bench.py ]; then timeout 120 python tools/bench.py --backend cupy --json "$out/bench_cupy.json" 2>&1; echo "bench exit $?"; fi
  date
} 2>&1 | tee "$out/gpu_check.log"
