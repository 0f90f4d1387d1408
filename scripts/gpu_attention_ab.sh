#!/usr/bin/env bash
# A/B of attention kernels built from different sources, in one device call: the C bench driver
# (tests/c/cache_gpu_vs_cpu.c bench) runs one case with each CUDA library in turn, twice, the order
# reversed the second time, so that a difference is neither the order nor the machine.
#   usage: scripts/gpu_attention_ab.sh "BENCH ARGS" lib1.so[.xz] lib2.so[.xz] ...
#   e.g.   scripts/gpu_attention_ab.sh "64 32 3 all" .gpu/a.so.xz .gpu/b.so.xz   (8 x 32768 MHA, all caches)
# Build each library here first (KIVI_CUDA_ARCH=90 npx bun build.ts --cuda in a worktree of the
# revision, then xz -c build/libkivi_cuda.so > .gpu/<name>.so.xz) and carry .gpu and build/libkivi_cpu.so.
set -uo pipefail
args=$1
shift
mkdir -p build /tmp/ab
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/ab_bench -ldl -lm || exit 1
libs=()
for l in "$@"; do
  case "$l" in
    *.xz) out="/tmp/ab/$(basename "$l" .xz)"; xz -dc "$l" > "$out"; libs+=("$out") ;;
    *) libs+=("$l") ;;
  esac
done
run() { echo "== $1"; KIVI_CUDA_LIB=$1 build/ab_bench bench $args | tail -n +4; }
for l in "${libs[@]}"; do run "$l"; done
for ((i = ${#libs[@]} - 1; i >= 0; i--)); do run "${libs[$i]}"; done
