#!/usr/bin/env bash
# Everything a GPU must show, in one command that fits one 15-minute allocation (issue 20): about
# 7 minutes on one H100 by estimate, in the order of value per second, so that a short allocation
# answers the most important questions first. Estimates (one H100, 16 cores; not yet measured, no
# GPU has run this) and limits, in seconds (tools/gpu_check_plan.py holds them; a test keeps the two
# in step):
#   step                 est  limit  what
#   wheelhouse            15     90  install --wheelhouse DIR into OUT_DIR/site (only with --wheelhouse)
#   env                   10     60  torch, the GPU, its shared memory
#   build                 70    240  the Bi-WKV extension (tools/build_ops.py --report: registers, spills)
#   kernel_focus          30    120  the kernels vs float64 at N=64, T 1/65/197, fp32 and bf16, determinism,
#                                    the v1 kernels (RWKVCLIP_BI_WKV_KERNEL=v1) at T 65/197, the dispatch tests
#   bench_wkv             53    120  tools/bench_wkv.py: ours (v2 and v1) vs the two-scan port, fla, SDPA
#   demo_data              5     60  the digits demo set (sklearn's bundled digits, no network)
#   train                 40    150  the demo recipe under DeepSpeed (NCCL, bf16, ZeRO-2, one rank), 100 steps
#   train_resume          25    120  the same run resumed from its checkpoint for 5 more steps
#   train_checks           2     30  metrics.json: resumed 100 -> 105, finite loss, the fused kernel throughout
#   bench_train           80    180  tools/bench_train.py: B/16 vs ViT-B-16 at 224/448/896 px, L/14, a profile
#   kernel_rest           50    240  the other CUDA kernel tests (N 16/80/128, long T, compile), the Triton kernel
#   sanitizer_memcheck    10     90  compute-sanitizer on tools/sanitize_wkv.py, one tool per step
#   sanitizer_racecheck   10    120
#   sanitizer_synccheck   10     90
#   sanitizer_initcheck   10     90
#   total                420         (at most 420: tests/test_gpu_tools.py)
# A step starts only if what is left of --budget covers its estimate (else it is recorded "not run"
# and a later, shorter one may still fit), and is cut at its limit or at the budget. Every step runs
# even when an earlier one failed; the exit is non-zero naming each failed step. Figures go to
# OUT_DIR/results.json, logs to OUT_DIR/logs/, a short table is printed last, and OUT_DIR/state.tsv
# says what each step did in this and earlier calls: `--only left` in a second call (with that
# state file back in OUT_DIR) runs exactly the steps not yet passed, plus what they need on a
# fresh machine (env, build, the demo data, the training run a resume continues).
#
# Usage: tools/gpu_check.sh [--cpu] [--wheelhouse DIR] [--only STEPS|left] [--budget S] [OUT_DIR]
#   --only A,B     run only these steps; names or prefixes (sanitizer = the four), or `left`
#   --budget S     wall-clock seconds for all steps (default 540 on a GPU: a 600 s call with time to
#                  copy the results out; 7200 with --cpu)
#   --cpu          every step at tiny size on the CPU (no GPU, no sanitizer binary; the two-scan
#                  baseline compiled for sm_90 in place of the extension build), from a clean clone:
#                  no Python or compile error can wait for the GPU
#   --dry-run      plan, record and report without running any step's command (tests of this script;
#                  GPU_CHECK_FAIL=a,b makes those steps fail)
#   --wheelhouse   install the wheels of tools/make_wheelhouse.py into OUT_DIR/site (pip --target,
#                  no index) and put it on PYTHONPATH first: DeepSpeed, Streaming, open_clip
#   PYTHON=...     the interpreter that holds torch (default python3).
#
# Before the allocation, where pip reaches PyPI (the GPU machine reaches nothing), in the repository
# root: `echo /.wheelhouse/ >>.git/info/exclude; python tools/make_wheelhouse.py --out .wheelhouse`
# (about 12 MiB for CPython 3.12, well under the 64 MiB a device call carries). The device call then
# carries `.wheelhouse` and runs
#   tools/gpu_check.sh --wheelhouse .wheelhouse /tmp/gc; cp /tmp/gc/results.json /tmp/gc/state.tsv $OUT/;
#   tar czf $OUT/logs.tgz -C /tmp/gc logs bench_wkv.md bench_train.json
# and a second call, with state.tsv copied into an ignored folder `.gc` that it carries too:
#   mkdir -p /tmp/gc && cp .gc/state.tsv /tmp/gc/ && tools/gpu_check.sh --wheelhouse .wheelhouse --only left /tmp/gc; ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
mode=gpu wheelhouse="" out=gpu_check_out budget="" only="" dry=0
while (($#)); do
  case "$1" in
    --cpu) mode=cpu ;;
    --dry-run) dry=1 ;;
    --budget) budget="${2:?--budget needs seconds}"; shift ;;
    --only) only="${2:?--only needs step names or left}"; shift ;;
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
plan_args=(--mode "$mode")
[[ -n $only ]] && plan_args+=(--only "$only")
[[ -n $wheelhouse ]] && plan_args+=(--wheelhouse)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
plan=$("$python" tools/gpu_check_plan.py plan "${plan_args[@]}" "$out") || exit 2
if [[ -z $plan ]]; then echo "gpu_check: nothing left to run ($out/state.tsv)"; exit 0; fi
export RWKVCLIP_EXTENSIONS_DIR="${RWKVCLIP_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$RWKVCLIP_EXTENSIONS_DIR}"
if [[ $mode == cpu ]]; then export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu; fi
: >"$out/steps.tsv"
budget=${budget:-$([[ $mode == gpu ]] && echo 540 || echo 7200)}
deadline=$(($(date +%s) + budget))
failed=()

pytest_opts=(-q -p no:cacheprovider -o "addopts=-ra")
if [[ $dry == 0 ]]; then
  if "$python" -c 'import xdist' 2>/dev/null && [[ $mode == gpu ]]; then pytest_opts+=(-n 6); fi
  if "$python" -c 'import pytest_timeout' 2>/dev/null; then pytest_opts+=(--timeout=300); fi
fi
# The focused kernel subset: the recipe's head size, the chunk edges and the B/16 length, both dtypes.
kernel_focus=()
for case in 1-64-fp32 65-64-bf16 197-64-fp32 197-64-bf16; do
  kernel_focus+=("tests/test_cuda_bi_wkv.py::test_matches_reference[$case]")
done
kernel_focus+=(tests/test_cuda_bi_wkv.py::test_bitwise_deterministic tests/test_cuda_bi_wkv.py::test_v1_kernel_matches_reference
              tests/test_ops_dispatch.py)
kernel_rest_deselect=()
for test in "${kernel_focus[@]:0:6}"; do kernel_rest_deselect+=(--deselect "$test"); done
if [[ $mode == gpu ]]; then
  train_args=(parallel.precision=bf16 parallel.zero_stage=2 checkpoint.every_steps=50 logging.tensorboard=false)
  steps=100 more=5 expect_fused=1
  bench_args=(--steps 3 --warmup 2 --profile rwkv-b16:224 --require-fused)
  wkv_args=(--repeats 10)
  kernel_env=(env RWKVCLIP_REQUIRE_GPU=1)
else
  train_args=(parallel.precision=fp32 parallel.zero_stage=2 checkpoint.every_steps=3 logging.tensorboard=false
              data.batch_size=8 eval.zeroshot.0.batch_size=32)
  steps=3 more=2 expect_fused=0
  bench_args=(--tiny --steps 1 --warmup 1 --batch 4 --profile rwkv-tiny:32)
  wkv_args=(--device cpu --tokens 17 33 --heads 2 --repeats 2)
  kernel_env=(env)
fi

# run_train PORT STEPS: the demo recipe under torchrun into OUT_DIR/train (a second call resumes it)
run_train() {
  "$python" -m torch.distributed.run --nproc-per-node=1 --master-port="$1" --max-restarts=0 rwkvclip_dist/train.py \
    --recipe recipes/demo_digits.yaml --run-dir "$out/train" "${train_args[@]}" train.steps="$2"
}

run_env() {
  if [[ $mode == gpu ]]; then
    "$python" - <<'EOF'
import torch
from rwkvclip_dist import ops
from rwkvclip_dist.ops import bi_wkv_cuda
assert torch.cuda.is_available(), "gpu_check: no CUDA GPU visible to torch"
props = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, sm_{props.major}{props.minor}, "
      f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
      f"opt-in shared memory {ops.shared_memory_optin(props)} bytes")
EOF
  else
    "$python" -c 'import torch; print("torch", torch.__version__, "(CPU mode)")'
  fi
}

run_train_checks() {
  "$python" - "$out/train/metrics.json" "$steps" "$more" "$expect_fused" <<'EOF'
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
}

run_sanitizer() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || find /usr/local/cuda*/bin -maxdepth 1 -name compute-sanitizer 2>/dev/null | head -n 1)
  if [[ -z $sanitizer ]]; then echo "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"; return 1; fi
  "$sanitizer" --tool "$1" --error-exitcode 3 "$python" tools/sanitize_wkv.py
}

# the command of each step (gpu_check_plan.py names them)
run_step() {
  case $1 in
    wheelhouse) "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
                  --target "$out/site" "$wheelhouse"/*.whl ;;
    env) run_env ;;
    build) "$python" tools/build_ops.py --report --jobs "$(nproc)" ;;
    # the benchmark's baseline is built only on a GPU machine: compile it here for sm_90 (needs nvcc)
    baseline_build) "$python" tools/bench_wkv.py --build-baseline 9.0 ;;
    kernel_focus) "${kernel_env[@]}" "$python" -m pytest "${pytest_opts[@]}" "${kernel_focus[@]}" ;;
    bench_wkv) "$python" tools/bench_wkv.py "${wkv_args[@]}" --out "$out/bench_wkv.md" ;;
    demo_data) "$python" tools/make_demo_data.py --out data/demo_digits ;;
    train) rm -rf "$out/train" && run_train 29517 "$steps" ;;
    train_resume) run_train 29518 $((steps + more)) ;;
    train_checks) run_train_checks ;;
    bench_train) "$python" tools/bench_train.py "${bench_args[@]}" --out "$out/bench_train.json" ;;
    kernel_rest) "${kernel_env[@]}" "$python" -m pytest "${pytest_opts[@]}" tests/test_cuda_bi_wkv.py \
                   tests/test_ops_triton.py "${kernel_rest_deselect[@]}" ;;
    sanitizer_cpu) "$python" tools/sanitize_wkv.py --device cpu ;;
    sanitizer_*) run_sanitizer "${1#sanitizer_}" ;;
    *) echo "gpu_check: no command for step $1"; return 2 ;;
  esac
}

# step NAME LIMIT ESTIMATE: run it if the budget covers its estimate, log to logs/NAME.log, record it.
step() {
  local name=$1 limit=$2 estimate=$3 start rc left
  echo "=== $name" >"$out/logs/$name.log"
  start=$(date +%s)
  left=$((deadline - start))
  if ((left < estimate || left < 5)); then
    echo "not run: ${left} s of the --budget of $budget s left, the step needs about $estimate s" >>"$out/logs/$name.log"
    rc=125
    echo "=== $name NOT RUN: ${left} s left of the budget, about $estimate s needed"
  else
    ((limit > left)) && limit=$left
    if ((dry)); then
      [[ ",${GPU_CHECK_FAIL:-}," == *",$name,"* ]]; rc=$((1 - $?))
      echo "dry run: limit $limit s" >>"$out/logs/$name.log"
    else
      # timeout runs programs, not functions: the step runs in a bash given these functions and variables
      timeout --kill-after=10 "$limit" bash -c "$(declare -f run_step run_env run_train run_train_checks run_sanitizer)
        $(declare -p python out mode wheelhouse steps more expect_fused pytest_opts kernel_focus \
          kernel_rest_deselect train_args bench_args wkv_args kernel_env); run_step $name" >>"$out/logs/$name.log" 2>&1
      rc=$?
    fi
    tail -n 25 "$out/logs/$name.log"
    if ((rc != 0)); then
      echo "=== $name FAILED (exit $rc$( ((rc == 124)) && echo ", over its ${limit} s limit")); log: $out/logs/$name.log"
    fi
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$out/steps.tsv"
  "$python" tools/gpu_check_plan.py record "$out" "$name" "$rc" "$(($(date +%s) - start))"
  ((rc != 0)) && failed+=("$name")
  if [[ $name == wheelhouse ]]; then export PYTHONPATH="$PYTHONPATH:$out/site" PATH="$out/site/bin:$PATH"; fi
  return 0
}

while read -r name limit estimate; do
  step "$name" "$limit" "$estimate" </dev/null
done <<<"$plan"

"$python" tools/gpu_check_report.py "$out" "$mode" "${failed[*]:-}"
left=$("$python" tools/gpu_check_plan.py left "$out")
if ((${#failed[@]})); then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $out/logs); left for a second call: --only left" \
       "(with $out/state.tsv in its OUT_DIR), i.e. $left" >&2
  exit 1
fi
echo "gpu_check: all steps passed ($mode mode); results in $out/results.json"
