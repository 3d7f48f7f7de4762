#!/usr/bin/env bash
# Everything about the CUDA Bi-WKV kernels that needs a GPU, in one command, using the Python that
# already holds torch (nothing is installed; the kernels compile on first use). It needs torch,
# pytest, numpy and pyyaml only (checked against a bare venv with just those), not DeepSpeed or
# Streaming:
#   1. tests/test_cuda_bi_wkv.py: the kernels against the float64 reference at every T and N of
#      issue 5, fp32/bf16/fp16, determinism, torch.compile + checkpointing, the tiny model
#   2. tools/bench_wkv.py: the timing table, written to benchmarks/bi_wkv_<gpu>.md (or $BENCH_OUT)
# Usage: tools/gpu_check.sh [extra pytest arguments]      PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RWKVCLIP_EXTENSIONS_DIR="${RWKVCLIP_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU visible to torch")'
# pyproject's pytest options name pytest-timeout; use it only where it is installed
pytest_opts=(-q -p no:cacheprovider -o "addopts=-ra")
if "$python" -c 'import pytest_timeout' 2>/dev/null; then pytest_opts+=(--timeout=900); fi
"$python" -m pytest "${pytest_opts[@]}" tests/test_cuda_bi_wkv.py "$@"
bench_args=()
if [[ -n "${BENCH_OUT:-}" ]]; then bench_args=(--out "$BENCH_OUT"); fi
"$python" tools/bench_wkv.py "${bench_args[@]}"
