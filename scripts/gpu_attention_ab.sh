#!/usr/bin/env bash
# A/B of attention kernels built from different sources, in one device call: the C bench driver
# (tests/c/cache_gpu_vs_cpu.c bench) runs one case with each CUDA library in turn, twice, the order
# reversed the second time, so that a difference is neither the order nor the machine.
#   usage: scripts/gpu_attention_ab.sh "BENCH ARGS" lib1.so[.xz][@VAR=value] lib2.so[.xz][@VAR=value] ...
#   e.g.   scripts/gpu_attention_ab.sh "64 32 3 all" .gpu/a.so.xz .gpu/b.so.xz   (8 x 32768 MHA, all caches)
#          scripts/gpu_attention_ab.sh "64 8 3 all 32 128" a.so@KIVI_MMA_KEYS=planes a.so   (one library, two
#          settings of a development knob: GQA 32/8)
# Build each library here first (KIVI_CUDA_ARCH=90 npx bun build.ts --cuda in a worktree of the
# revision, then xz -c build/libkivi_cuda.so > .gpu/<name>.so.xz) and carry .gpu and build/libkivi_cpu.so.
set -uo pipefail
args=$1
shift
mkdir -p build /tmp/ab
gcc -std=c11 -O2 -Icuda/include tests/c/cache_gpu_vs_cpu.c -o build/ab_bench -ldl -lm || exit 1
libs=()
for v in "$@"; do
  l=${v%%@*}
  env=""
  [ "$l" != "$v" ] && env=${v#*@}
  case "$l" in
    *.xz) out="/tmp/ab/$(basename "$l" .xz)"; [ -f "$out" ] || xz -dc "$l" > "$out"; l=$out ;;
  esac
  libs+=("$l${env:+@$env}")
done
run() {
  local l=${1%%@*} env=""
  [ "$l" != "$1" ] && env=${1#*@}
  echo "== $1"
  env KIVI_CUDA_LIB="$l" $env build/ab_bench bench $args | tail -n +4
}
for l in "${libs[@]}"; do run "$l"; done
for ((i = ${#libs[@]} - 1; i >= 0; i--)); do run "${libs[$i]}"; done
