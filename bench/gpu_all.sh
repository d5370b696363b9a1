#!/usr/bin/env bash
# Every GPU check and benchmark, as ONE device call of at most 9 minutes (the device tool lends about
# 15 minutes of device time per task, starts included). Run from the repo root on the device machine
# (torch + CUDA + Triton + transformers there; no Ray, so the Ray tiers are not run here):
#     bash bench/gpu_all.sh                 # everything below, most important first (~8.5 min; the
#                                           # steps' limits add up to more: the last ones are skipped
#                                           # when the budget is spent)
#     QUICK=1 bash bench/gpu_all.sh         # the test tier and the offload check only (~4 min)
# Order: (1) the GPU test tier (compiled Triton kernels, CUDA copy stream, pinned memory, CUDA-graph
# decode), (1b) quantised kernels, (1c) eager vs CUDA-graph decode step time, then
# (2) the expert cache measured next to the simulator's projection for the same routing (issue 14:
# checks offload/decision.py's cost model on a real link) with ours vs transformers + our cache vs
# accelerate rows (issue 11), (3) kernels, (4) MoE layer vs transformers, (5) training tokens/s,
# Triton vs reference kernels, (6) `moe serve` load test. Each step has its own time limit, logs to
# <logs>/<step>.log and the script goes on if one fails. Logs + bench/results are packed into ONE file,
# $OUT/gpu_all.tgz; the summary of exit codes and times is printed last and is in summary.txt.
set -u
OUT=${OUT:-/tmp/gpu_all}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS
BUDGET=${BUDGET:-520}   # seconds for all steps; a step never starts with less than 20 s left
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$LOGS/gpu.txt" 2>&1
date -u +%FT%TZ >> "$LOGS/gpu.txt"
declare -a SUMMARY
step() {  # step NAME TIMEOUT_S CMD...: runs CMD for at most min(TIMEOUT_S, what is left of BUDGET)
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then SUMMARY+=("$name skipped (budget spent)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)")
  echo "== $name rc=$rc $((SECONDS - t0))s"; tail -n 3 "$LOGS/$name.log"
}
# 1. correctness first
step gpu_tests 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton.py \
     tests/test_offload_equivalence.py tests/test_offload_memory.py tests/test_cuda_graphs.py
# 1b. quantised experts (issue 20): the fused-dequantisation kernel compiled and checked against
# dequantise-then-reference (one case per format: odd D, F and an expert with no rows; the interpreter
# tests cover the other shapes on CPU), then timed against the bf16 grouped MLP at the Mixtral shape.
# Two steps with their own limits: every (config, format, E) is a Triton compile (4 autotune configs x 2
# kernels x 3 formats = 24 in each step, ~1 s apiece, not yet timed on a GPU), and a slow compile in the
# tests must not leave the bench without time.
step quant_kernel_tests 60 python -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py \
     -k "triton_equals and counts0"
step quant_kernel_bench 100 python bench/quant_kernel_bench.py --rows 16 256
# 1c. CUDA-graph decode (issue 23 item 3): eager vs graph step time, batches 1/8/16, tokens must match
#     (-> bench/results/cuda_graph_decode_cuda.{json,md}; the offload step gave 30 s of its budget for it)
step cuda_graphs 50 python bench/cuda_graph_decode.py --batches 1 8 16 --reps 4 --steps 10
# 2. expert cache on the real link: measured tok/s next to the projection; ours, transformers + cache, accelerate
step offload 160 python bench/offload.py --models mixtral4 --batches 1,8 --caches 25 \
     --modes lru,predictive,predictive+cpu --hf-cache-modes predictive --new-tokens 16
if [ -z "${QUICK:-}" ]; then
# 3. kernels: Triton vs torch._grouped_mm vs per-expert loop vs dense GEMM
step kernels 80 python bench/kernel_bench.py --tokens 512 8192 --warmup-ms 20 --rep-ms 60
# 4. MoE layer vs transformers' Mixtral block, real shapes, bf16
step moe_layer 45 python bench/moe_layer.py --device cuda --quick
# 5. end-to-end training tokens/s, small preset, Triton vs reference kernels
step train_small_triton 45 env MOE_KERNELS=triton python bench/train_tiny.py --preset small --device cuda --max-steps 30
mv bench/results/train_small_cuda.json bench/results/train_small_cuda_triton.json 2>/dev/null
mv bench/results/train_small_cuda.md bench/results/train_small_cuda_triton.md 2>/dev/null
step train_small_reference 40 env MOE_KERNELS=reference python bench/train_tiny.py --preset small --device cuda --max-steps 30
# 6. moe serve under load (needs fastapi + uvicorn + openai on the device; logged as failed otherwise)
step serve 40 python bench/serve.py --device cuda --requests 64 --clients 16 --rounds 1 --train-steps 10
fi
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGS/summary.txt"
echo "total $((SECONDS - T0))s" | tee -a "$LOGS/summary.txt"
tar czf "$OUT/gpu_all.tgz" -C "$LOGS" . -C "$PWD" bench/results
