#!/usr/bin/env bash
# GPU check, for a machine whose image already has cupy, torch and transformers and no network:
#   1. the test suite with CuPy as a namespace: every layer against torch on CUDA, and whole models
#      (logits, greedy tokens against HF) on the cupy backend;
#   2. the side-by-side benchmark, npvlm on cupy against HF transformers on torch CUDA.
# Writes its log (and the benchmark's JSON) into $OUT when set, ./gpu_out otherwise. Under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import cupy, torch, transformers, numpy; print('cupy', cupy.__version__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| numpy', numpy.__version__)"
  python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
  timeout 300 python -m pytest -q -p no:cacheprovider -m cupy tests/ 2>&1
  echo "cupy tests: exit $?"
  timeout 150 python tools/bench.py vs-hf --preset mid --backend cupy --new-tokens 32 --json "$out/bench_cupy.json" 2>&1
  echo "bench: exit $?"
  date
} 2>&1 | tee "$out/gpu_check.log"
