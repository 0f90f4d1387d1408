#!/usr/bin/env bash
# One device call under Deno (the two runtimes do not fit one carry): the C GPU-vs-CPU cache driver and
# its benchmark (runtime-free, for comparison with earlier runs), the decode-batch and cache GPU suites,
# the attention benchmark (section attention-deno) and the call-overhead benchmark, written into a copy
# of bench/results; memcheck of a tensor-core spec. Everything lands in $OUT/deno.tgz.
#   usage: KIVI_PREBUILT=lib.so scripts/gpu_deno.sh   (carry .gpu with deno.xz and the library)
set -uo pipefail
r=/tmp/deno-run
mkdir -p "$r/results" build
cp bench/results/nvidia-h200.json bench/results/nvidia-h200.md "$r/results/" 2>/dev/null
archive="$OUT/deno.tgz"
source "$(dirname "$0")/_step.sh"
step build bash -c "deno run -A build.ts --cpu-only && cp '$KIVI_PREBUILT' build/libkivi_cuda.so"
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/cache_gpu_vs_cpu -ldl -lm
step c_cache build/cache_gpu_vs_cpu
TAIL=12 step c_bench_mha build/cache_gpu_vs_cpu bench 64 32 -1 all
TAIL=12 step c_bench_gqa8 build/cache_gpu_vs_cpu bench 64 8 3 all
for ns in 4 8 12 16 24 32; do # the split count of 1x4096 against the cost model's choice
  KIVI_NSPLIT=$ns TAIL=4 step c_bench_1x4096_ns$ns build/cache_gpu_vs_cpu bench 64 32 0 all
done
step sdpa python3 bench/sdpa_reference.py "$r/sdpa.json"
TAIL=8 step ts_gpu deno test -A --no-check tests/batch_test.ts tests/cache_gpu_test.ts tests/hostile_fuzz_test.ts
TAIL=40 step bench_attention deno run -A bench/attention.ts --torch "$r/sdpa.json" --out "$r/results"
TAIL=30 step bench_overhead deno run -A bench/overhead.ts --backend cuda --out "$r/results"
KIVI_ONLY=11 step memcheck_cache timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 build/cache_gpu_vs_cpu
tar czf "$OUT/deno.tgz" -C "$r" .
