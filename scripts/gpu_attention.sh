#!/usr/bin/env bash
# Attention kernels on the lent GPU in one go, without Bun: builds the CUDA library for this device's
# architecture only, runs the C GPU-vs-CPU cache driver (every spec, or KIVI_ONLY=i) and times the
# attention cases of the table with the C bench driver. Logs go to $OUT (default build/gpu-out).
#   usage: [KIVI_PREBUILT=lib.so] scripts/gpu_attention.sh [check] [bench] [ncu]
set -uo pipefail
out="${OUT:-build/gpu-out}"
mkdir -p "$out" build
what="${*:-check bench}"
has() { [[ " $what " == *" $1 "* ]]; }
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader
t0=$SECONDS
if [ -n "${KIVI_PREBUILT:-}" ]; then # a CUDA library compiled elsewhere for this architecture
  bun build.ts --cpu-only > "$out/build.log" 2>&1 && cp "$KIVI_PREBUILT" build/libkivi_cuda.so || { tail -30 "$out/build.log"; exit 1; }
else
  KIVI_CUDA_ARCH=${arch:-90} bun build.ts > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
fi
echo "build: $((SECONDS - t0)) s"
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/cache_gpu_vs_cpu -ldl -lm || exit 1
status=0
if has check; then
  t0=$SECONDS
  build/cache_gpu_vs_cpu > "$out/check.log" 2>&1 || status=1
  echo "check: exit $status in $((SECONDS - t0)) s"; grep -E "FAIL|PASS" "$out/check.log" | tail -12
fi
if has bench; then
  b=build/cache_gpu_vs_cpu
  {
    $b bench 64 32 3 all
    $b bench 64 8 3 all
    $b bench 64 4 3 def
    $b bench 64 4 3 def 28
    $b bench 64 2 3 def 14 64
    $b bench 64 32 0 all
    $b bench 64 8 0 all
  } > "$out/bench.log" 2>&1 || status=1
  grep -vE "^(device|q_heads|case)" "$out/bench.log"
fi
if has ncu; then # stall reasons and pipe use of one tensor-core attention launch per case
  n=0
  for c in "64 8 3 def" "64 32 3 def" "64 32 0 u2" "64 4 3 def"; do
    n=$((n + 1))
    ncu --clock-control none --kernel-name regex:k_attend_mma --launch-skip 10 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
      --section LaunchStats --section ComputeWorkloadAnalysis \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__inst_executed.sum" \
      build/cache_gpu_vs_cpu bench $c > "$out/ncu$n.log" 2>&1
    echo "== ncu $c"
    grep -E "k_attend|Duration|Issued Warp|Eligible Warps|smsp__inst_executed.sum" "$out/ncu$n.log" | head -12
    grep -E "stalled_.*ratio" "$out/ncu$n.log" | awk '{print $NF, $1}' | sort -g -r | head -8
    grep -E "inst_executed_pipe_.*pct" "$out/ncu$n.log" | awk '{print $NF, $1}' | sort -g -r | head -6
  done
fi
exit $status

