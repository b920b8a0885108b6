#!/usr/bin/env bash
# Every GPU check of the project in one command, for the lent GPU machine (or any CUDA box), from the
# repository root: device facts, the training suite, the InfoNCE kernel table, the kernel tests compiled
# (not interpreted), and the ONNX inference table. Logs and JSON go to $OUT (the device tool's folder)
# or ./gpu-out. Each part has its own time limit, so one failure does not take the others down.
#   carry [".gpu"] (python benchmarks/gpu_suite.py --prepare-carry) for the real corpus and MiniLM;
#   onnxruntime-gpu: ../shared/tools/ort-gpu-for-device.sh, installed into /tmp/ortsite (found here).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "run_gpu_checks: no CUDA GPU here"; exit 1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/ortsite ] && export PYTHONPATH=/tmp/ortsite${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
# The tests import the installed package: install it without dependencies (no network needed).
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/pip.log" 2>&1 || echo "pip install -e . failed (see pip.log): kernel tests skipped"

timeout "${SUITE_TIMEOUT:-300}" python3 benchmarks/gpu_suite.py --json "$out/gpu_suite.json" "$@" 2>&1 \
  | tee "$out/gpu_suite.log" | grep -v '^row-json'
timeout 150 python3 benchmarks/info_nce_table.py 2>&1 | tee "$out/info_nce_table.log" | tail -14
python3 -c "import mirrorfast.kernels" 2>/dev/null && \
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_info_nce.py 2>&1 | tail -3 | tee "$out/kernel_tests.log"
timeout 240 python3 benchmarks/onnx_gpu_table.py 2>&1 | tee "$out/onnx_gpu_table.log" | tail -14
