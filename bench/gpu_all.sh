#!/usr/bin/env bash
# Every GPU check and benchmark the open issues ask for, on a lent H100, in stages that each fit one
# device call (10 min per command; about 30 min of device time per session, so stage D may need
# the next session). Run from the repo root on the device machine (torch + CUDA + Triton +
# transformers there, no Ray):
#     bash bench/gpu_all.sh A     # GPU test tier, MoE layer vs transformers, small-preset training (~8 min)
#     bash bench/gpu_all.sh B     # kernels benchmark (~8 min)
#     bash bench/gpu_all.sh C     # expert cache vs accelerate offload (~9 min)
#     bash bench/gpu_all.sh D     # balance study, small preset, micro vs global (~9 min)
# Each step logs to <logs>/<step>.log and goes on if an earlier one failed; result JSON/markdown land
# in bench/results/. Everything (logs + bench/results) is packed into ONE file, $OUT/gpu_<stage>.tgz,
# since the device tool returns at most 8 files. The summary of exit codes is printed last.
set -u
OUT=${OUT:-/tmp/gpu_all}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$LOGS/gpu.txt" 2>&1
declare -a SUMMARY
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  echo "== $name rc=$rc $((SECONDS - t0))s"; tail -n 3 "$LOGS/$name.log"
}
STAGE=${1:?usage: bash bench/gpu_all.sh A|B|C|D}
if [ "$STAGE" = A ]; then
# 1. correctness first: the GPU test tier (compiled Triton kernels, copy stream, memory)
step gpu_tests 200 python -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_offload_equivalence.py \
     tests/test_offload_memory.py
fi
if [ "$STAGE" = B ]; then
# 2. kernels: Triton vs torch._grouped_mm vs per-expert loop vs dense GEMM (issue 3)
step kernels 500 python bench/kernels.py
fi
if [ "$STAGE" = A ]; then
# 3. MoE layer vs transformers' Mixtral block, real shapes, bf16 (issue 2)
step moe_layer 150 python bench/moe_layer.py --device cuda
# 4. end-to-end training tokens/s, small preset, Triton vs reference kernels (issue 3)
step train_small_triton 60 env MOE_KERNELS=triton python bench/train_tiny.py --preset small --device cuda --max-steps 60
mv bench/results/train_small_cuda.json bench/results/train_small_cuda_triton.json 2>/dev/null
mv bench/results/train_small_cuda.md bench/results/train_small_cuda_triton.md 2>/dev/null
step train_small_reference 60 env MOE_KERNELS=reference python bench/train_tiny.py --preset small --device cuda --max-steps 60
fi
if [ "$STAGE" = C ]; then
# 5. expert cache vs accelerate offload (issues 5 and 6)
step offload 520 python bench/offload.py
fi
if [ "$STAGE" = D ]; then
# 6. balance study, small preset, one seed (issue 7); split so each half fits
step study 520 python bench/balance_study.py --preset small --device cuda --seeds 1 --modes micro,global
fi
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGS/summary.txt"
tar czf "$OUT/gpu_$STAGE.tgz" -C "$LOGS" . -C "$PWD" bench/results
