#!/usr/bin/env bash
# One device call that checks a build on the GPU and measures it: the C GPU-vs-CPU drivers, the
# TypeScript GPU suites (and the hostile fuzzer, README examples, staging) under Bun, the demo, the
# attention benchmark with PyTorch SDPA beside it, the quantize benchmark, and compute-sanitizer on
# tensor-core cache specs, the decode batch tests and the call-overhead benchmark. Everything lands in $OUT/final.tgz (the device returns at most 8 files).
#   usage: [KIVI_PREBUILT=lib.so] [KIVI_FINAL_QUICK=1] scripts/gpu_final.sh
#   KIVI_FINAL_QUICK=1 leaves out the quantize benchmark and racecheck (kernels they cover unchanged)
set -uo pipefail
r=/tmp/final
mkdir -p "$r" build
archive="$OUT/final.tgz"
cp bench/results/nvidia-h200.json bench/results/nvidia-h200.md "$r/" 2>/dev/null # sections replaced in place
source "$(dirname "$0")/_step.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${KIVI_PREBUILT:-}" ]; then
  step build bash -c "bun build.ts --cpu-only && cp '$KIVI_PREBUILT' build/libkivi_cuda.so"
else
  step build bun build.ts
fi
gcc -std=c11 -O2 -Icuda/include tests/c/gpu_vs_cpu.c -o build/gpu_vs_cpu -ldl -lm
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/cache_gpu_vs_cpu -ldl -lm
step c_quant build/gpu_vs_cpu
step c_cache build/cache_gpu_vs_cpu
step demo bun demo.ts
step sdpa python3 bench/sdpa_reference.py "$r/sdpa.json"
TAIL=40 step bench_attention bun bench/attention.ts --torch "$r/sdpa.json" --json "$r/attention.json" --out "$r"
[ -z "${KIVI_FINAL_QUICK:-}" ] && TAIL=20 step bench_quant bun bench/quant.ts --out "$r"
TAIL=30 step bench_overhead bun bench/overhead.ts --backend cuda --out "$r"
TAIL=6 step ts_gpu bun test --timeout=600000 tests/cache_gpu_test.ts tests/quant_gpu_test.ts tests/sticky_gpu_test.ts \
  tests/readme_test.ts tests/staging_test.ts tests/hostile_fuzz_test.ts tests/hardening_test.ts tests/abi_test.ts \
  tests/examples_test.ts tests/backend_test.ts tests/batch_test.ts tests/leaks_test.ts tests/model_random_gpu_test.ts
KIVI_ONLY=11 step memcheck_cache timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 build/cache_gpu_vs_cpu
[ -z "${KIVI_FINAL_QUICK:-}" ] && KIVI_ONLY=19 step racecheck_cache timeout 150 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 build/cache_gpu_vs_cpu
tar czf "$OUT/final.tgz" -C "$r" .
