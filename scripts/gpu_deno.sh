#!/usr/bin/env bash
# One device call under Deno (the two runtimes do not fit one carry; the C drivers run in the Bun call,
# scripts/gpu_final.sh): the decode-batch and cache GPU suites, the attention benchmark (section
# attention-deno) and the call-overhead benchmark, written into a copy of bench/results. Everything
# lands in $OUT/deno.tgz.
#   usage: KIVI_PREBUILT=lib.so scripts/gpu_deno.sh   (carry .gpu with deno.xz and the library)
set -uo pipefail
r=/tmp/deno-run
mkdir -p "$r/results" build
cp bench/results/nvidia-h200.json bench/results/nvidia-h200.md "$r/results/" 2>/dev/null
archive="$OUT/deno.tgz"
source "$(dirname "$0")/_step.sh"
step build bash -c "deno run -A build.ts --cpu-only && cp '$KIVI_PREBUILT' build/libkivi_cuda.so"
step sdpa python3 bench/sdpa_reference.py "$r/sdpa.json"
TAIL=8 step ts_gpu deno test -A --no-check tests/batch_test.ts tests/cache_gpu_test.ts tests/hostile_fuzz_test.ts
TAIL=40 step bench_attention deno run -A bench/attention.ts --torch "$r/sdpa.json" --out "$r/results"
TAIL=30 step bench_overhead deno run -A bench/overhead.ts --backend cuda --out "$r/results"
tar czf "$OUT/deno.tgz" -C "$r" .
