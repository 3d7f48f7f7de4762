#!/usr/bin/env bash
# Everything a GPU must show, in one command (issue 14), in under 8 minutes on one H100:
#   env          torch, the GPU, the Bi-WKV implementation chosen for each head size
#   build        the Bi-WKV extension for this GPU (tools/build_ops.py --report: registers, spills)
#   kernel_tests tests/test_cuda_bi_wkv.py: kernels vs float64 references (N 16/64/80/128, long-T
#                slow decays, a full chip, element-wise checks), determinism, compile, autocast
#   train        the demo recipe under DeepSpeed (NCCL, bf16, ZeRO-2, one rank), 100 steps, then
#                resumed from its checkpoint for 5 more; metrics.json's bi_wkv_calls must show the
#                fused kernel (cuda > 0, chunked = 0)
#   bench_train  tools/bench_train.py: RWKV-CLIP B/16 vs open_clip ViT-B-16 at 224/448/896 px with
#                and without activation checkpointing, L/14 at 224 (images/s, peak memory, MFU), and
#                a torch.profiler trace of one B/16 step (top kernels in the results)
#   sanitizer    compute-sanitizer racecheck, synccheck, initcheck, memcheck on tools/sanitize_wkv.py
#   bench_wkv    tools/bench_wkv.py: ours vs the two-scan port, fla (if installed) and SDPA
# Every step runs even when an earlier one failed (one GPU allocation gives every answer); the run
# exits non-zero naming each failed step. All figures go to OUT_DIR/results.json, logs to
# OUT_DIR/logs/; a short table is printed last.
#
# Usage: tools/gpu_check.sh [--cpu] [--wheelhouse DIR] [--only STEPS] [--budget S] [OUT_DIR]
#   --only A,B     run only these steps (a second allocation for what the first did not finish:
#                  sanitizer and bench names match by prefix, e.g. --only bench_train,sanitizer)
#   --budget S     wall-clock seconds for all steps (default 500 on a GPU, 3600 with --cpu): a step
#                  is cut at what is left, and steps that find nothing left fail as "not run", so
#                  the run always ends with its results file inside the allocation.
#   --cpu          every step at tiny size on the CPU (no GPU, no sanitizer binary), and the
#                  benchmark's two-scan baseline compiled for sm_90: no Python or compile error
#                  can wait for the GPU. The GPU-only assertions are replaced by their CPU
#                  counterparts (the chunked path serves every call).
#   --wheelhouse   install the wheels of tools/make_wheelhouse.py into OUT_DIR/site (pip --target,
#                  no index) and put it on PYTHONPATH first: DeepSpeed, Streaming, open_clip on a
#                  machine that has only torch and common packages.
#   PYTHON=...     the interpreter that holds torch (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
mode=gpu wheelhouse="" out=gpu_check_out budget="" only=""
while (($#)); do
  case "$1" in
    --cpu) mode=cpu ;;
    --budget) budget="${2:?--budget needs seconds}"; shift ;;
    --only) only=",${2:?--only needs step names},"; shift ;;
    --wheelhouse) wheelhouse="${2:?--wheelhouse needs a directory}"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
python=${PYTHON:-python3}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd) || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RWKVCLIP_EXTENSIONS_DIR="${RWKVCLIP_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$RWKVCLIP_EXTENSIONS_DIR}"
if [[ $mode == cpu ]]; then export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu; fi
: >"$out/steps.tsv"
budget=${budget:-$([[ $mode == gpu ]] && echo 500 || echo 3600)}
deadline=$(($(date +%s) + budget))
failed=()

# step NAME TIMEOUT_S COMMAND...: run it, log to logs/NAME.log, record status and seconds. A step
# gets at most what is left of --budget; one that finds less than 10 s left fails as not run.
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  if [[ -n $only && $name != wheelhouse && $name != env && $only != *",$name,"* && $only != *",${name%%_*},"* ]]
  then return; fi
  # the CPU mode builds DeepSpeed's CPU communication op on first use and shares small machines
  [[ $mode == cpu ]] && limit=$((limit * 3))
  echo "=== $name: $*" >"$out/logs/$name.log"
  start=$(date +%s)
  left=$((deadline - start))
  if ((left < 10)); then
    echo "not run: the --budget of $budget s is spent" >>"$out/logs/$name.log"
    printf '%s\t%s\t%s\n' "$name" 125 0 >>"$out/steps.tsv"
    failed+=("$name")
    echo "=== $name FAILED: not run, the --budget of $budget s is spent"
    return
  fi
  ((limit > left)) && limit=$left
  timeout --kill-after=10 "$limit" "$@" >>"$out/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/logs/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$out/steps.tsv"
  if ((rc != 0)); then
    failed+=("$name")
    echo "=== $name FAILED (exit $rc$( ((rc == 124)) && echo ", over its ${limit} s limit")); log: $out/logs/$name.log"
  fi
}

if [[ -n $wheelhouse ]]; then
  step wheelhouse 300 "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
    --target "$out/site" "$wheelhouse"/*.whl
  export PYTHONPATH="$PYTHONPATH:$out/site" PATH="$out/site/bin:$PATH"
fi

pytest_opts=(-q -p no:cacheprovider -o "addopts=-ra")
if "$python" -c 'import xdist' 2>/dev/null && [[ $mode == gpu ]]; then pytest_opts+=(-n 6); fi
if "$python" -c 'import pytest_timeout' 2>/dev/null; then pytest_opts+=(--timeout=600); fi

if [[ $mode == gpu ]]; then
  step env 120 "$python" - <<'EOF'
import torch
from rwkvclip_dist import ops
from rwkvclip_dist.ops import bi_wkv_cuda
assert torch.cuda.is_available(), "gpu_check: no CUDA GPU visible to torch"
props = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, sm_{props.major}{props.minor}, "
      f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
      f"opt-in shared memory {ops.shared_memory_optin(props)} bytes")
EOF
  step build 300 "$python" tools/build_ops.py --report --jobs "$(nproc)"
  step kernel_tests 420 env RWKVCLIP_REQUIRE_GPU=1 "$python" -m pytest "${pytest_opts[@]}" tests/test_cuda_bi_wkv.py tests/test_ops_dispatch.py tests/test_ops_triton.py
  train_args=(parallel.precision=bf16 parallel.zero_stage=2 checkpoint.every_steps=50 logging.tensorboard=false)
  steps=100 more=5 expect_fused=1
  bench_args=(--steps 3 --warmup 2 --profile rwkv-b16:224 --require-fused)
  wkv_args=(--repeats 10)
else
  step env 120 "$python" -c 'import torch; print("torch", torch.__version__, "(CPU mode)")'
  # The benchmark's baseline is built only on a GPU machine: compile it here so a GPU session cannot meet
  # a compile error (needs nvcc).
  step baseline_build 300 "$python" tools/bench_wkv.py --build-baseline 9.0
  step kernel_tests 600 "$python" -m pytest "${pytest_opts[@]}" tests/test_cuda_bi_wkv.py tests/test_ops_dispatch.py
  train_args=(parallel.precision=fp32 parallel.zero_stage=2 checkpoint.every_steps=3 logging.tensorboard=false
              data.batch_size=8 eval.zeroshot.0.batch_size=32)
  steps=3 more=2 expect_fused=0
  bench_args=(--tiny --steps 1 --warmup 1 --batch 4 --profile rwkv-tiny:32)
  wkv_args=(--device cpu --tokens 17 33 --heads 2 --repeats 2)
fi

# training: a fresh run, then the same run directory resumed with a later final step
if [[ -z $only || $only == *",train,"* ]]; then rm -rf "$out/train"; fi
step train 300 "$python" -m torch.distributed.run --nproc-per-node=1 --master-port=29517 --max-restarts=0 \
  rwkvclip_dist/train.py --recipe recipes/demo_digits.yaml --run-dir "$out/train" \
  "${train_args[@]}" train.steps=$steps
step train_resume 240 "$python" -m torch.distributed.run --nproc-per-node=1 --master-port=29518 --max-restarts=0 \
  rwkvclip_dist/train.py --recipe recipes/demo_digits.yaml --run-dir "$out/train" \
  "${train_args[@]}" train.steps=$((steps + more))
step train_checks 60 "$python" - "$out/train/metrics.json" "$steps" "$more" "$expect_fused" <<'EOF'
import json, sys
path, steps, more, fused = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
metrics = json.load(open(path))
assert metrics["resumed_from_step"] == steps and metrics["steps"] == steps + more, \
    f"{path}: resumed from {metrics['resumed_from_step']} to {metrics['steps']}, expected {steps} -> {steps + more}"
assert metrics["final_loss"] == metrics["final_loss"], f"{path}: final loss is NaN"
calls = metrics.get("bi_wkv_calls")
assert calls is not None, f"{path} has no 'bi_wkv_calls' (the trainer writes rwkvclip_dist.ops.dispatch_counts())"
if fused:
    assert calls["cuda"] > 0 and calls["chunked"] == 0, f"the fused Bi-WKV kernel was not used throughout: {calls}"
else:
    assert calls["chunked"] > 0 and calls["cuda"] == 0, f"CPU run: expected the chunked path only: {calls}"
print(f"resumed {steps} -> {metrics['steps']}, final loss {metrics['final_loss']:.4f}, "
      f"{metrics['samples_per_s']:.0f} samples/s, Bi-WKV calls {calls}")
EOF

if [[ $mode == gpu ]]; then
  sanitizer=$(command -v compute-sanitizer || find /usr/local/cuda*/bin -maxdepth 1 -name compute-sanitizer 2>/dev/null | head -n 1)
  for tool in memcheck racecheck synccheck initcheck; do
    if [[ -z $sanitizer ]]; then
      step "sanitizer_$tool" 5 sh -c 'echo "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"; exit 1'
    else
      step "sanitizer_$tool" 240 "$sanitizer" --tool "$tool" --error-exitcode 3 \
        "$python" tools/sanitize_wkv.py
    fi
  done
else
  step sanitizer_cpu 300 "$python" tools/sanitize_wkv.py --device cpu
fi

# benchmarks last: correctness first when the allocation runs short
step bench_wkv 240 "$python" tools/bench_wkv.py "${wkv_args[@]}" --out "$out/bench_wkv.md"
step bench_train 420 "$python" tools/bench_train.py "${bench_args[@]}" --out "$out/bench_train.json"

"$python" tools/gpu_check_report.py "$out" "$mode" "${failed[*]:-}"
if ((${#failed[@]})); then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $out/logs)" >&2
  exit 1
fi
echo "gpu_check: all steps passed ($mode mode); results in $out/results.json"
