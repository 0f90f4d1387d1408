#!/usr/bin/env bash
# Everything that needs a GPU, in one go (see ../shared/GPU.md for carrying Bun to the device):
# build, the C GPU-vs-CPU drivers, the TypeScript suites under Bun, the benchmarks, the demo, and
# one compute-sanitizer memcheck and racecheck pass. Logs and results go to $OUT (default build/gpu-out).
#   usage: scripts/gpu_check.sh [all|test|bench|demo|sanitize]...
set -uo pipefail
out="${OUT:-build/gpu-out}"
mkdir -p "$out"
what="${*:-all}"
has() { [[ " $what " == *" all "* || " $what " == *" $1 "* ]]; }
status=0
run() { # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader
run build bun build.ts || exit 1
gcc -std=c11 -O2 -Icuda/include tests/c/gpu_vs_cpu.c -o build/gpu_vs_cpu -ldl -lm
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/cache_gpu_vs_cpu -ldl -lm
if has test; then
  run c_quant build/gpu_vs_cpu
  run c_cache build/cache_gpu_vs_cpu
  run ts_tests bun test --timeout=600000 tests/
fi
if has bench; then
  run bench_quant bun bench/quant.ts --out "$out"
  run bench_attention bun bench/attention.ts --out "$out"
fi
if has demo; then
  run demo bun demo.ts
fi
if has sanitize; then
  run memcheck timeout 240 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 build/gpu_vs_cpu
  run memcheck_cache timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 build/cache_gpu_vs_cpu
  # shared-memory hazards between threads of a block (the reductions, the attention tiles)
  run racecheck timeout 300 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 build/gpu_vs_cpu
  run racecheck_cache timeout 300 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 build/cache_gpu_vs_cpu
fi
exit $status
