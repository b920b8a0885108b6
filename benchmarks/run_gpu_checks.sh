#!/usr/bin/env bash
# Every GPU check of the project in one command, for the lent GPU machine (or any CUDA box), from the
# repository root. Logs and JSON go to $OUT (the device tool's folder) or ./gpu-out.
#
#   bash benchmarks/run_gpu_checks.sh [PART ...]     PART: suite restart onnx kernel tests sweep sweep-small
#                                                    profile attention
#                                                    (default: suite onnx kernel tests)
#
# The whole run shares one time budget (BUDGET seconds, default 560: one device call may run 600 s), and
# the parts run in order of what is least measured: the training suite (issue 6), the ONNX GPU table
# (issue 4), the InfoNCE table (issue 3), the kernel tests compiled. Each part gets at most its own cap
# and what is left of the budget, so a slow part cannot take the others down, and a summary of what ran,
# passed or timed out ends the log.
#
# Inputs: carry [".gpu"] (python benchmarks/gpu_suite.py --prepare-carry, 45 MiB) for the real corpus and
# MiniLM; onnxruntime-gpu from ../shared/tools/ort-gpu-for-device.sh (a 255 MB wheel in parts under .ortgpu/,
# installed into /tmp/ortsite, which this script puts first on PYTHONPATH). One call carries at most 64 MiB
# and the machine goes back after ~30 s idle, so a session chains 5 calls without pauses (the q parts are
# the wheel re-split so that the smallest, q1, rides with .gpu in the first call; session 3 ran exactly this):
#   1:    carry [".gpu", ".ortgpu/q1"]  command "mkdir -p /tmp/ort && cp .ortgpu/q1/* /tmp/ort/"
#   2-4:  carry [".ortgpu/qN"]          command "mkdir -p /tmp/ort && cp .ortgpu/qN/* /tmp/ort/"
#   5:    carry [".ortgpu/q5"]          command "mkdir -p /tmp/ort && cp .ortgpu/q5/* /tmp/ort/ &&
#                                                bash .ortgpu/q5/install.sh; BUDGET=540 bash benchmarks/run_gpu_checks.sh
#                                                suite onnx kernel tests attention"
# Seen on an H200, 2026-11-27 (session 20): one part per call of the transfer, so that each call measures
# something and its results can steer the next: call 1 (start included) `suite` 193 s of device time, call 2
# `kernel` 132 s, call 3 the InfoNCE table + `restart` 159 s, call 4 `--sweep 16384,768` 90 s, call 5 the
# wheel's install + `onnx` 119 s (88 s for the part: two BERT-base exports of ~26 s each), call 6 the ONNX
# table again with an environment variable 98 s; 795 s in all, the machine warm throughout (a call must
# follow the last within ~30 s). Parts alone there: suite 136 s (19 rows), restart 95 s, onnx 88 s, the
# sweep at N=16384 77 s. The kernel part's checks alone took its whole 103 s cap then; the table now runs
# first (info_nce_table.py prints it before its checks), so a cap cuts only checks.
# (H100, 2026-11-27, session 14: suite 140 s, onnx 51 s, kernel 85 s, tests over 180 s for 190 compiled tests,
# attention 21 s. H200, 2026-11-26: suite 76 s with 9 rows, onnx 46 s, tests 76 s with 91 tests.)
# What is left to measure (RESULTS.md's session 20 section says what was measured):
#   - issue 3: the whole call with the stripes default (STRIPES_DEFAULT, since session 20): the table's `triton`
#     row at N=16384 next to `triton (fused)`, the default before; then `sweep` for more stripe shapes;
#   - issue 4: the onnx part's attention experiments (ATTENTION_VARIANTS in onnx_gpu_table.py: the fp16 file in
#     onnxruntime's packing mode, and without its mask input) against the shipped fp16 file, with their
#     kernel profiles: the shipped file's attention (cuDNN SDPA) took 0.77 of its 3.99 ms of GPU time. If packing
#     mode wins, it is the candidate for the fp16 file (its ops run on CUDA only: the export's parity check
#     would need the CUDA EP);
#   - issue 6: the last layer for [CLS] alone in training (mirrorfast/last_layer.py, since session 20, on by
#     default): the suite's rows now run it, and its `-fulllast` rows (bert:bf16-fulllast,
#     bert:bf16-half-fulllast) run the full layer next to them; the Triton attention kernel as the default
#     path's (since session 21: `bert:bf16` is now what `bert:bf16-triton` was, the `-flash` rows time
#     FlashAttention beside it; a fresh machine's first epoch now also compiles the attention kernels);
#     `profile` (where the fastest combination's 13.9 ms a step went; the goal is 12); `tests`
#     (tests/test_last_layer.py's GPU cases check its FlashAttention path against the full layer; the suite's
#     MiniLM STS-B rows check training quality).
#   - issue 3 at N=200: `sweep-small` times each kernel of the split candidates alone (the forward, merge, backward
#     and finalize launches: where the 53.9 µs go), which no GPU has run; the 20 µs target needs that first.
#     Each line also counts the kernel's programs and the bytes of x each loads (info_nce_table.loop_traffic):
#     counted, the default backward loads x ~150 times over (78 programs x 1.2 MiB), and if each multiprocessor's
#     share of L2 bandwidth is what binds (a hypothesis: 41 µs alone, with 128- or 256-wide D steps alike),
#     times follow KiB per program and waves, not FLOPs.
# A plan for 900 s: call 1 carry [".gpu", ".ortgpu/q1"] `suite` (BUDGET=200), call 2 `kernel` (BUDGET=130),
# call 3 `profile` (BUDGET=150), call 4 `tests` (BUDGET=120), call 5 the install + `onnx` (BUDGET=150), each
# call also copying its part of the wheel; no pause between calls. `sweep-small` (~60-100 s, not timed) rides
# with whichever call's parts finish early (the budget cuts it, not the call).
# What to read first: info_nce_table.log's `triton` and `triton (fused)` rows at N=16384, onnx_gpu_table.log's
# attention-variant rows and profiles, profile.log's top operators.
# $OUT returns at most 8 files: the parts write one log each, the device facts go into summary.txt.
# Without onnxruntime-gpu the ONNX part still runs and lists its CUDA EP rows as skipped.
set -uo pipefail
budget=${BUDGET:-560}
start=$SECONDS
known="suite restart onnx kernel tests sweep sweep-small profile attention"  # the case branches below
usage="usage: bash benchmarks/run_gpu_checks.sh [PART ...], PART: $known (default: suite onnx kernel tests)"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(suite onnx kernel tests)
# Every part checked before anything is created or installed: a typo costs no device time.
for part in "${parts[@]}"; do
  case $part in
    -h|--help) echo "$usage"; exit 0 ;;
    *) [[ " $known " == *" $part "* ]] || { echo "run_gpu_checks: error: unknown part '$part'; $usage" >&2; exit 2; } ;;
  esac
done
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" ||
  { echo "run_gpu_checks: error: no CUDA GPU here" >&2; exit 1; }
out=${OUT:-gpu-out}
mkdir -p "$out"
# The tokenizers keep their default parallelism, as users run them: until session 21 this script set
# TOKENIZERS_PARALLELISM=false, so the trainer's background tokenization of the next epoch's masked views ran on
# one core (0.56-0.74 s for the 10k sentences on the 2-core dev CPU, 2026-11-28). The H200's MiniLM rows of
# session 20 fit a second epoch that waited for it (--bf16: epochs 0.55 + 0.60 s; --fp16, whose first epoch
# was longer: 0.63 + 0.36 s); the wait was not measured then. The suite's `wait s` column measures it now.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d /tmp/ortsite ] && export PYTHONPATH=/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}
facts=/tmp/mirrorfast-device.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$facts"
python3 - <<'EOS' 2>&1 | tee -a "$facts"
import importlib
for name in ("torch", "triton", "transformers", "onnxruntime"):
    try:
        module = importlib.import_module(name)
        extra = module.get_available_providers() if name == "onnxruntime" else ""
        print(name, module.__version__, *([extra] if extra else []))
    except Exception as exc:  # a missing or broken package is a fact worth logging, not a stop
        print(name, "unavailable:", type(exc).__name__, exc)
EOS
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$facts"
# The benchmark parts need pytest-benchmark: from the carry's wheels (gpu_suite.py --prepare-carry) if absent.
python3 -c "import pytest_benchmark" 2>/dev/null || { [ -d .gpu/wheels ] &&
  python3 -m pip install -q --no-index --find-links .gpu/wheels pytest-benchmark >/tmp/mirrorfast-pip.log 2>&1; } ||
  echo "pytest-benchmark unavailable: the attention part will fail (carry .gpu with its wheels/)"
# The kernel tests import the installed package: install it without dependencies (no network needed).
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/mirrorfast-pip.log 2>&1 ||
  { echo "pip install -e . failed:"; tail -5 /tmp/mirrorfast-pip.log; }
# What the trainer will pick on this machine (device, attention, loss), into the facts of summary.txt.
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from from_checkout import ensure_importable; ensure_importable()
from mirrorfast.cli import main; main(['env'])" 2>&1 | grep -E "^(gpu|train_|onnxruntime|Error|[A-Za-z]*Error)" | tee -a "$facts"

summary=()
# run NAME CAP LOG COMMAND...: at most CAP seconds and never past the budget; output to $out/LOG.
run() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((budget - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then summary+=("$name: not run (budget spent)"); return; fi
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$log" 2>&1
  local rc=$?
  local how="rc $rc"; [ $rc -eq 124 ] && how="TIMED OUT"
  summary+=("$name: $how, $((SECONDS - t0))s, log $log")
  grep -v '^row-json' "$out/$log" | tail -${TAIL:-16}
}

for part in "${parts[@]}"; do
  case $part in
    suite)  run "training suite" 260 gpu_suite.log python3 benchmarks/gpu_suite.py --json "$out/gpu_suite.json" ;;
    # Issue 6 lets compile time "be cached across runs": each row here is a fresh process (CUDA context, cuBLAS,
    # FlashAttention all cold) that finds Triton's disk cache as the parts before it left it. After `suite`, its
    # first epochs are a second `mirrorfast train` on the machine; as the first part, a first one.
    restart) run "first epochs, a process per row" 150 restart.log python3 benchmarks/gpu_suite.py --isolate --rows bert:fp16,bert:bf16,bert:bf16-half,minilm:fp16 ;;
    onnx)   run "ONNX GPU table" 200 onnx_gpu_table.log python3 benchmarks/onnx_gpu_table.py --gpu-only ;;
    kernel) run "InfoNCE table" 150 info_nce_table.log python3 benchmarks/info_nce_table.py --quick ;;
    # the InfoNCE file first: the one that changed since its last compiled run (session 14: every loss kernel
    # now compiles without fp contraction; the other files all passed then), so a cap cuts only the others' tail
    tests)  run "kernel tests (compiled)" 260 kernel_tests.log python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_kernels_info_nce.py tests/test_packed_attention_kernel.py tests/test_residual_layernorm_kernel.py tests/test_fused_norm.py tests/test_opt_ins_together.py tests/test_prefetch.py tests/test_last_layer.py ;;
    attention) run "packed attention + residual LayerNorm kernels" 120 attention.log python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_packed_attention.py benchmarks/test_bench_residual_layernorm.py --benchmark-only --benchmark-columns=min,median,mean ;;
    # N=200 alone (issue 3's 20 µs): every kernel of the split candidates timed alone, never run on a GPU yet
    sweep-small) run "InfoNCE block sweep, N=200" 150 sweep_small.log python3 benchmarks/info_nce_table.py --no-checks --sweep 200,768 ;;
    sweep)  run "InfoNCE block sweep" 300 sweep.log python3 benchmarks/info_nce_table.py --no-checks --sweep 16384,768 --sweep 200,768 --sweep 200,768,bfloat16 --sweep 200,384,bfloat16 ;;
    # the default path (Triton attention since session 21), then the fastest measured combination, --half-model
    # on top (H200: 16.8 vs 13.9 ms a step), kernel by kernel
    profile) run "step profiles" 240 profile.log bash -c "python3 benchmarks/profile_step.py --epochs 1 &&
               python3 benchmarks/profile_step.py --half-model --epochs 1" ;;
    *) echo "run_gpu_checks: error: unknown part '$part'; $usage" >&2; exit 2 ;;  # refused above already
  esac
done
echo "=== summary ($((SECONDS - start))s of ${budget}s)"
{ cat "$facts"; printf '%s\n' "${summary[@]}"; } | tee "$out/summary.txt"
