#!/usr/bin/env bash
# Every GPU check and benchmark the open issues ask for, in one call on a lent H100, within ~25 min.
# Run from the repo root on the device machine (torch + CUDA + Triton + transformers there, no Ray):
#     OUT=/some/dir bash bench/gpu_all.sh
# Each step logs to $OUT/<step>.log and goes on if an earlier one failed; result JSON/markdown land in
# bench/results/ and are copied to $OUT. The summary of exit codes is printed last.
set -u
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
declare -a SUMMARY
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  echo "== $name rc=$rc $((SECONDS - t0))s"; tail -n 3 "$OUT/$name.log"
}
# 1. correctness first: the GPU test tier (compiled Triton kernels, copy stream, memory)
step gpu_tests 420 python -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_offload_equivalence.py \
     tests/test_offload_memory.py
# 2. kernels: Triton vs torch._grouped_mm vs per-expert loop vs dense GEMM (issue 3)
step kernels 480 python bench/kernels.py
# 3. MoE layer vs transformers' Mixtral block, real shapes, bf16 (issue 2)
step moe_layer 300 python bench/moe_layer.py --device cuda
# 4. end-to-end training tokens/s, small preset, Triton vs reference kernels (issue 3)
step train_small_triton 240 env MOE_KERNELS=triton python bench/train_tiny.py --preset small --device cuda --max-steps 60
mv bench/results/train_small_cuda.json bench/results/train_small_cuda_triton.json 2>/dev/null
mv bench/results/train_small_cuda.md bench/results/train_small_cuda_triton.md 2>/dev/null
step train_small_reference 240 env MOE_KERNELS=reference python bench/train_tiny.py --preset small --device cuda --max-steps 60
# 5. expert cache vs accelerate offload (issues 5 and 6)
step offload 540 python bench/offload.py
# 6. balance study, small preset, one seed (issue 7); split so each half fits
step study_a 420 python bench/balance_study.py --preset small --device cuda --seeds 1 --modes micro,global
cp bench/results/*.json bench/results/*.md bench/results/*.png "$OUT"/ 2>/dev/null
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
